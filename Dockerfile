# syntax=docker/dockerfile:1
# streamrnn Beam worker (SDK harness) image: usable as Dataflow's --sdk_container_image, as a
# Flink/Spark portable job's DOCKER environment, or as the worker pool sidecar of an EXTERNAL
# environment (run it with --worker_pool). Beam's Python boot layer comes from the Beam SDK image
# of the SAME version as the pinned apache-beam (deploy/versions.env), the documented
# custom-container pattern; the project and its exported/ models are baked in; no torch.
#
#   docker build -t streamrnn-worker .                          # CUDA 13 + cuDNN 9, onnxruntime-gpu
#   docker build -t streamrnn-worker:cpu --build-arg VARIANT=cpu .   # CPU only, onnxruntime
#
# The ARG defaults below must equal deploy/versions.env (tests/test_deploy_install.py checks it).
ARG BEAM_VERSION=2.77.0
ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04
ARG VARIANT=gpu

FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION} AS beam_sdk

FROM ${CUDA_IMAGE} AS base-gpu
FROM ${CPU_IMAGE} AS base-cpu

FROM base-${VARIANT} AS worker
ARG PYTHON_VERSION
ARG VARIANT
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
RUN "python${PYTHON_VERSION}" -m venv /opt/venv
# Beam's boot runs `python` from PATH; without this variable it would make its own venv from the
# base interpreter, which cannot see /opt/venv's packages.
ENV PATH=/opt/venv/bin:$PATH RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1

WORKDIR /opt/streamrnn
COPY pyproject.toml README.md ./
COPY deploy/install_worker.sh deploy/versions.env ./deploy/
COPY streamrnn ./streamrnn
COPY beam_jobs ./beam_jobs
COPY exported ./exported
# the one install script CI also runs (into a fresh venv)
RUN python -m pip install --no-cache-dir -q --upgrade pip \
 && ./deploy/install_worker.sh --python /opt/venv/bin/python $([ "$VARIANT" = cpu ] && echo --cpu) . \
 && rm -rf build *.egg-info

COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam

RUN useradd --create-home --uid 10001 streamrnn && mkdir -p /out && chown streamrnn /out
USER streamrnn
# models baked in: --model /opt/streamrnn/exported/charlm.onnx (or market.onnx) on the workers
ENV STREAMRNN_MODEL=/opt/streamrnn/exported/charlm.onnx
ENTRYPOINT ["/opt/apache/beam/boot"]
