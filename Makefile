# Every target installs what it needs into .venv first; nothing has to be installed by hand.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export ORT_DISABLE_TELEMETRY := 1
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: install test serve bento gpu-check container container-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files re-run an install only when pyproject.toml changes.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch, mlflow, bentoml, onnxruntime"
	touch $@

# Serving needs only `.[serve]` (bentoml, onnxruntime-gpu, Pillow, NumPy): no torch. On a GPU host,
# `make serve SERVE_EXTRAS=serve,cuda` also installs the CUDA 13 / cuDNN 9 wheels onnxruntime-gpu needs;
# on a CPU-only host `SERVE_EXTRAS=serve-cpu` installs plain onnxruntime instead (into a venv without
# onnxruntime-gpu: both install the same module).
SERVE_EXTRAS ?= serve
$(VENV)/.serve-installed-$(SERVE_EXTRAS): pyproject.toml | $(BIN)/python
	@if [ "$(SERVE_EXTRAS)" = serve-cpu ] && $(BIN)/pip show -q onnxruntime-gpu 2>/dev/null; then \
		echo "$(VENV) has onnxruntime-gpu, which plain onnxruntime cannot join: make clean first"; exit 1; fi
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

# Container images (opt-in, not in `make test`: a Docker engine with BuildKit, and the registries):
# FLAVOR=gpu (bentofile.yaml: onnxruntime-gpu with its CUDA / cuDNN wheels) or FLAVOR=cpu
# (bentofile-cpu.yaml: onnxruntime). The image is tagged <name>:<bento version> and <name>:latest.
# CONTAINERIZE_OPTS go to `bentoml containerize` (e.g. --opt network=host where builds need it).
FLAVOR ?= gpu
BENTOFILE_gpu := bentofile.yaml
BENTOFILE_cpu := bentofile-cpu.yaml
IMAGE_gpu := roadsight
IMAGE_cpu := roadsight-cpu
BENTOFILE = $(or $(BENTOFILE_$(FLAVOR)),$(error FLAVOR must be gpu or cpu, not '$(FLAVOR)'))
IMAGE = $(IMAGE_$(FLAVOR))
# containerize copies the Bento to $$TMPDIR, and BentoML 1.4.39 then refuses its dockerfile_template as
# "outside of current working directory" (bentoml/BentoML#5566): the copy is made under build/ instead.
CONTAINERIZE_OPTS ?=
container: install
	tag=$$(PATH="$(abspath $(BIN)):$$PATH" $(BIN)/bentoml build -f $(BENTOFILE) -o tag | sed -n 's/^__tag__://p') && \
	test -n "$$tag" && mkdir -p build/containerize && TMPDIR="$(CURDIR)/build/containerize" \
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/bentoml containerize "$$tag" -t "$$tag" -t $(IMAGE):latest $(CONTAINERIZE_OPTS)

# Runs $(IMAGE):latest on a free loopback port and checks it (benchmarks/container_check.py);
# CHECK_OPTS="--gpus all" on a GPU host requires the models to run on CUDA.
CHECK_OPTS ?=
container-check: install
	$(BIN)/python -m benchmarks.container_check --image $(IMAGE):latest --flavor $(FLAVOR) $(CHECK_OPTS)

clean:
	rm -rf $(VENV) .pytest_cache
