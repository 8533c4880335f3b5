# syntax=docker/dockerfile:1
# streamrnn Beam worker (SDK harness) image: usable as Dataflow's --sdk_container_image, as a
# Flink/Spark portable job's DOCKER environment, or as the worker pool sidecar of an EXTERNAL
# environment (run it with --worker_pool). Beam's Python boot layer comes from the Beam SDK image
# of the SAME version as the pinned apache-beam (deploy/versions.env), the documented
# custom-container pattern; the project and its exported/ models are baked in; no torch.
#
#   docker build -t streamrnn-worker .                          # CUDA 13 + cuDNN 9, onnxruntime-gpu
#   docker build -t streamrnn-worker:cpu --build-arg VARIANT=cpu .   # CPU only, onnxruntime
#   docker build -t streamrnn-worker:dataflow --build-arg WORKER_USER=root .   # for Dataflow
#
# The version ARG defaults below must equal deploy/versions.env (tests/test_deploy.py checks it).
# PYTHON_VERSION: the workers' Python minor version; it must be the launcher's (workers refuse to run
#   otherwise): --build-arg PYTHON_VERSION="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
# BEAM_EXTRAS: Beam's gs:// and s3:// filesystems and Pub/Sub on the workers (empty: none).
# WORKER_USER: the user the SDK harness runs as. streamrnn (uid 10001, the default) for Flink, Spark and
#   Kubernetes; root for Dataflow, which mounts its directories under /var/opt as root and expects the SDK
#   container to run as root. The install steps run as streamrnn either way.
ARG BEAM_VERSION=2.77.0
ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04
ARG VARIANT=gpu
ARG BEAM_EXTRAS=gcp,aws
ARG WORKER_USER=streamrnn

FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION} AS beam_sdk

FROM ${CUDA_IMAGE} AS base-gpu
FROM ${CPU_IMAGE} AS base-cpu

FROM base-${VARIANT} AS worker
ARG PYTHON_VERSION
ARG VARIANT
ARG BEAM_EXTRAS
ARG WORKER_USER
RUN case "$WORKER_USER" in streamrnn|10001|root|0) ;; \
      *) echo "WORKER_USER: expected streamrnn (Flink, Kubernetes) or root (Dataflow), got '$WORKER_USER'" >&2; exit 2 ;; \
    esac
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Ubuntu 24.04 ships Python 3.12; the worker's Python must match the launcher's and the Beam SDK
# image's minor version, so it comes from the deadsnakes PPA.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends software-properties-common ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" \
 && apt-get purge -y -qq software-properties-common && apt-get autoremove -y -qq \
 && rm -rf /var/lib/apt/lists/*
# The worker user owns the venv: Beam's boot pip-installs staged packages (--extra_package,
# --requirements_file) into it at start-up, as this user (or as root, which may too). The home, the
# working directory of a worker, is open to any user: `docker run --user "$(id -u):$(id -g)"` starts there.
RUN useradd --create-home --uid 10001 streamrnn \
 && chmod 755 /home/streamrnn \
 && mkdir -p /out /opt/streamrnn \
 && "python${PYTHON_VERSION}" -m venv /opt/venv \
 && chown -R streamrnn /out /opt/streamrnn /opt/venv
# Beam's boot runs `python` from PATH; without this variable it would make its own venv from the
# base interpreter, which cannot see /opt/venv's packages.
ENV PATH=/opt/venv/bin:$PATH RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1
USER streamrnn

WORKDIR /opt/streamrnn
COPY --chown=streamrnn pyproject.toml README.md ./
COPY --chown=streamrnn deploy/install_worker.sh deploy/versions.env ./deploy/
COPY --chown=streamrnn streamrnn ./streamrnn
COPY --chown=streamrnn beam_jobs ./beam_jobs
COPY --chown=streamrnn exported ./exported
# the one install script CI also runs (into a fresh venv); the shipped models come with the
# package: --model shipped:charlm or shipped:market
RUN python -m pip install --no-cache-dir -q --upgrade pip \
 && ./deploy/install_worker.sh --python /opt/venv/bin/python $([ "$VARIANT" = cpu ] && echo --cpu) \
      --beam-extras "$BEAM_EXTRAS" . \
 && rm -rf build *.egg-info

COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam
# out of the source tree: `python -m` puts the working directory first on sys.path, and workers must
# import the installed package (and any staged package boot installs over it), not /opt/streamrnn
WORKDIR /home/streamrnn
# root (Dataflow) or streamrnn; the venv is readable by any user, so `docker run --user UID:GID` works too
USER ${WORKER_USER}
ENTRYPOINT ["/opt/apache/beam/boot"]
