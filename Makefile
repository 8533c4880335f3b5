# Quickstart:  make demo   (runs the main job)     make test   (runs the test suite)
# Both create .venv by themselves on a machine with Python 3.11+.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CI and tests pin the CPU build of torch (users may install any torch >= 2.4).
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# The tests check the worker image's ONNX Runtime pin against its CUDA base: they run on that pin.
ORT_PIN := $(shell sed -n 's/^ONNXRUNTIME_VERSION=//p' deploy/versions.env)

$(VENV)/.dev: $(VENV)/.runtime deploy/versions.env
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e '.[train,test,eval,plot]'
	if [ "$$(uname -s)" = Linux ] && { [ "$$(uname -m)" = x86_64 ] || [ "$$(uname -m)" = aarch64 ]; }; then \
		$(PY) -m pip install -q "onnxruntime-gpu==$(ORT_PIN)"; fi
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m beam_jobs.next_token --demo --output runs/demo
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[plot]'
	$(PY) -m beam_jobs.market_forecast --demo --output runs/market --plot runs/market/forecast.png

test: $(VENV)/.dev
	$(PY) -m ruff check streamrnn beam_jobs tests
	$(PY) -m pytest -q -o console_output_style=classic

bench: $(VENV)/.dev
	$(PY) -m streamrnn.cli.commands bench operator --json

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
