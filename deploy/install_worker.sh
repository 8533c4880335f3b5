#!/usr/bin/env bash
# Install a streamrnn Beam worker (SDK harness) into a Python environment: the pinned Beam
# (deploy/versions.env), the pinned ONNX Runtime (GPU build, or the CPU build with --cpu), and streamrnn
# itself from a source tree or a built wheel, with its shipped models. No torch: workers only
# run the exported ONNX models. The Dockerfile RUNs this script; CI runs it into a fresh venv.
#
#   deploy/install_worker.sh [--python PY] [--cpu] [--beam-extras LIST] [SOURCE]
#
#   --python PY         the interpreter to install into (default: python3); a venv's bin/python
#                       installs into that venv
#   --cpu               onnxruntime (CPU) instead of onnxruntime-gpu, on every platform
#   --beam-extras LIST  Beam's extras, comma-separated, e.g. gcp,aws: the gs:// and s3://
#                       filesystems and Pub/Sub need them on the workers (default: none)
#   SOURCE              a streamrnn source tree or streamrnn-*.whl (default: this checkout)
#
# Extra pip flags come from the environment as usual (PIP_NO_INDEX, PIP_FIND_LINKS, ...).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py=python3
cpu=0
extras=""
src="$root"
while [ $# -gt 0 ]; do
  case "$1" in
    --python)
      [ $# -ge 2 ] && [ -n "$2" ] || { echo "install_worker.sh: --python: expected an interpreter path, got none" >&2; exit 2; }
      py="$2"; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --beam-extras)
      [ $# -ge 2 ] || { echo "install_worker.sh: --beam-extras: expected names such as gcp,aws, got none" >&2; exit 2; }
      extras="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "install_worker.sh: unknown option $1" >&2; exit 2 ;;
    *) src="$1"; shift ;;
  esac
done
[[ "$extras" =~ ^([a-z0-9_]+(,[a-z0-9_]+)*)?$ ]] || {
  echo "install_worker.sh: --beam-extras: expected names such as gcp,aws, got '$extras'" >&2; exit 2; }
[ -e "$src" ] || { echo "install_worker.sh: SOURCE: expected a source tree or wheel, got no such path $src" >&2; exit 2; }
# PYTHON_VERSION from the environment (the Dockerfile's build argument) wins over the pin's default
want_python="${PYTHON_VERSION:-}"
# shellcheck source=versions.env
. "$here/versions.env"
: "${BEAM_VERSION:?deploy/versions.env sets no BEAM_VERSION}"
: "${ONNXRUNTIME_VERSION:?deploy/versions.env sets no ONNXRUNTIME_VERSION}"
want_python="${want_python:-$PYTHON_VERSION}"

have="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$have" != "$want_python" ]; then
  echo "install_worker.sh: warning: $py is Python $have, the worker Python asked for is $want_python" \
       "(workers refuse to run for a launcher on another minor version)" >&2
fi

pip=("$py" -m pip install --no-cache-dir --disable-pip-version-check -q)
beam="apache-beam${extras:+[$extras]}==$BEAM_VERSION"
if [ "$cpu" = 1 ]; then
  # streamrnn's own dependencies, with the CPU build of ONNX Runtime on every platform
  mapfile -t deps < <("$py" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    name = d.split(";")[0].strip()
    if name.startswith("onnxruntime"):
        continue  # both builds: the pinned CPU build is installed instead
    print(name)
PY
  )
  "${pip[@]}" "${deps[@]}" "onnxruntime==$ONNXRUNTIME_VERSION" "$beam"
  "${pip[@]}" --no-deps "$src"
else
  "${pip[@]}" "$src" "onnxruntime-gpu==$ONNXRUNTIME_VERSION" "$beam"
fi

# what a worker needs, importable and at the pinned version
# -I: the installed package, never a source tree in the working directory (the Docker build runs in one)
"$py" -I - "$BEAM_VERSION" "$extras" "$ONNXRUNTIME_VERSION" <<'PY'
import sys
import apache_beam, onnxruntime, streamrnn
from apache_beam.io.filesystems import FileSystems
from streamrnn.beam import StatefulInference  # noqa: F401
import os
if apache_beam.__version__ != sys.argv[1]:
    sys.exit(f"install_worker.sh: expected apache-beam {sys.argv[1]}, got {apache_beam.__version__}")
if onnxruntime.__version__ != sys.argv[3]:
    sys.exit(f"install_worker.sh: expected onnxruntime {sys.argv[3]}, got {onnxruntime.__version__}")
for extra, url in (("gcp", "gs://bucket/x"), ("aws", "s3://bucket/x"), ("azure", "azfs://account/container/x")):
    if extra in sys.argv[2].split(","):
        try:
            FileSystems.get_filesystem(url)
        except ValueError as e:
            sys.exit(f"install_worker.sh: --beam-extras {extra}: expected the {url.split(':')[0]}:// filesystem, got {e}")
if not os.path.exists(streamrnn.DEFAULT_MODEL):
    sys.exit(f"install_worker.sh: expected the shipped model at {streamrnn.DEFAULT_MODEL}, got no such file")
print(f"streamrnn worker: beam {apache_beam.__version__}, onnxruntime {onnxruntime.__version__} "
      f"{onnxruntime.get_available_providers()}, streamrnn at {os.path.dirname(streamrnn.__file__)}")
PY
