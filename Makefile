# Every target installs what it needs into .venv first; nothing has to be installed by hand.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export ORT_DISABLE_TELEMETRY := 1
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: install test serve bento gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files re-run an install only when pyproject.toml changes.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch, mlflow, bentoml, onnxruntime"
	touch $@

# Serving needs only `.[serve]` (bentoml, onnxruntime-gpu, Pillow, NumPy): no torch. On a GPU host,
# `make serve SERVE_EXTRAS=serve,cuda` also installs the CUDA 13 / cuDNN 9 wheels onnxruntime-gpu needs.
SERVE_EXTRAS ?= serve
$(VENV)/.serve-installed-$(SERVE_EXTRAS): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[$(SERVE_EXTRAS)]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import bentoml, onnxruntime, PIL, numpy"
	touch $@

install: $(VENV)/.dev-installed

test: install
	$(BIN)/python -m pytest -q

# The service on http://$(HOST):$(PORT) (localhost only unless HOST is given), models from models/
# (or ROADSIGHT_MODELS_DIR). See README "Serving" for the endpoints and settings.
HOST ?= 127.0.0.1
PORT ?= 3000
serve: $(VENV)/.serve-installed-$(SERVE_EXTRAS)
	$(BIN)/bentoml serve serving.service:Roadsight --host $(HOST) --port $(PORT)

# A Bento (serving code + models/) in the local bento store; then `bentoml containerize roadsight:latest`.
bento: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/bentoml build

# On an NVIDIA GPU host: both models on CUDA, answers against the CPU provider, P1/P2/dehaze figures as
# JSON in benchmarks/results/ (benchmarks/gpu_check.sh; refuses at once without a GPU).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache
