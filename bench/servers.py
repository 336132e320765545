"""Start, watch and stop the servers that ``gatemix bench serve`` compares.

Each system is a set of processes started in their own process groups (so a
stop takes their engine workers too), with logs under one folder, free
loopback ports, and a readiness wait on ``/v1/models`` that fails fast with
the log's tail when a process dies. :class:`ProcessUsage` samples the resident
memory and CPU time of a system's whole process tree while the load runs.

Systems (``SYSTEMS``):

* ``ensemble``: ``gatemix serve`` of the composite (K experts, one engine);
* ``uniform``: the same experts under a constant uniform gate (no router, no state): what the
  project's gate costs;
* ``single``: ``gatemix serve`` of one expert's plain Hugging Face folder;
* ``vllm``: vLLM's own OpenAI server of the same expert folder;
* ``student``: ``gatemix serve`` of a distilled student folder, when given;
* ``draft``: the ensemble again, decoding behind a draft model (``--draft``, the student by default);
* ``lockstep``: K vLLM servers, one per expert, behind the lockstep server.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from typing_extensions import Self

from gatemix.server.settings import Settings

logger = logging.getLogger(__name__)

SYSTEMS = ("ensemble", "uniform", "single", "vllm", "student", "draft", "lockstep")


class ServerStartError(RuntimeError):
    """A server died or did not become ready; the message carries its log's tail."""


@dataclass
class ServerOptions:
    """Engine settings shared by every system, so that they differ only in the server."""

    max_model_len: int = field(metadata={"help": "context length; covers prompt + output"})
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences per engine step"})
    dtype: str = field(default="float32", metadata={"help": "engine dtype"})
    kv_cache_gib: int = field(default=1, metadata={"help": "CPU KV cache per engine (whole GiB)"})
    enforce_eager: bool = field(default=True, metadata={"help": "no torch.compile, as gatemix's default"})
    startup_timeout_s: float = field(default=300.0, metadata={"help": "wait this long for /v1/models"})
    log_dir: Path = field(default=Path("artifacts/bench/logs"), metadata={"help": "one log file per process"})


@dataclass
class RunningSystem:
    """A started system: where to send the load and which processes to watch."""

    name: str
    base_url: str
    model_name: str
    processes: list[subprocess.Popen]
    expert_urls: list[str] = field(default_factory=list)  # lockstep only: the per-expert vLLM servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def managed_process(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run ``command`` in its own process group; on exit stop the whole group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("starting %s (log %s)", " ".join(command), log_path)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_ready(base_url: str, procs: list[subprocess.Popen], logs: list[Path], timeout_s: float) -> str:
    """Poll ``/v1/models`` until it answers; returns the first model id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise ServerStartError(f"{proc.args[:4]} exited with {proc.returncode}; {log}:\n{_log_tail(log)}")
        try:
            response = httpx.get(f"{base_url}/v1/models", timeout=5.0)
            if response.status_code == 200:
                return response.json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise ServerStartError(f"{base_url} not ready after {timeout_s:.0f}s; {logs[-1]}:\n{_log_tail(logs[-1])}")


def _env(options: ServerOptions) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(options.kv_cache_gib)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # vLLM's server closes idle connections after 5 s, and the load generator reuses
    # pooled ones for longer: the baseline would fail requests that gatemix (65 s) serves.
    env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = str(Settings.model_fields["timeout_keep_alive"].default)
    return env


def vllm_serve_command(model_dir: str, port: int, options: ServerOptions) -> list[str]:
    """vLLM's own OpenAI server (the ``vllm`` console script of vllm-cpu fails at start)."""
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", options.dtype,
        "--max-model-len", str(options.max_model_len), "--max-num-seqs", str(options.max_num_seqs),
        "--gpu-memory-utilization", "0.1",
    ]
    if options.enforce_eager:
        command.append("--enforce-eager")
    return command


def gatemix_serve_command(model_dir: str, port: int, options: ServerOptions, served_model_name: str) -> list[str]:
    """``gatemix serve`` of a composite or a plain expert folder."""
    return [
        sys.executable, "-m", "gatemix.cli", "serve", "--model-dir", str(model_dir),
        "--served-model-name", served_model_name, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", options.dtype, "--max-model-len", str(options.max_model_len),
        "--max-num-seqs", str(options.max_num_seqs), "--kv-cache-gib", str(options.kv_cache_gib),
        "--log-level", "warning", "--enforce-eager" if options.enforce_eager else "--no-enforce-eager",
    ]


def lockstep_mixer_command(expert_urls: list[str], tokenizer_dir: str, port: int,
                           weights: list[float] | None = None, expert_models: list[str] | None = None) -> list[str]:
    """The lockstep mixer in front of already running expert servers (``expert_models``: each one's
    model name there, None for the first each lists)."""
    command = [sys.executable, "-m", "gatemix.bench.lockstep_server", "--tokenizer", str(tokenizer_dir),
               "--host", "127.0.0.1", "--port", str(port)]
    for k, url in enumerate(expert_urls):
        command += ["--expert", url, *(["--expert-model", expert_models[k]] if expert_models else [])]
    if weights is not None:
        command += ["--weights", ",".join(f"{w:g}" for w in weights)]
    return command


@contextmanager
def _single_server(name: str, command_for_port, options: ServerOptions,
                   model_name: str | None = None) -> Iterator[RunningSystem]:
    """One server process; the load goes to ``model_name``, or to the first model it lists."""
    port = free_port()
    log = options.log_dir / f"{name}.log"
    with managed_process(command_for_port(port), log, _env(options)) as proc:
        base_url = f"http://127.0.0.1:{port}"
        first_model = wait_ready(base_url, [proc], [log], options.startup_timeout_s)
        yield RunningSystem(name=name, base_url=base_url, model_name=model_name or first_model, processes=[proc])


@contextmanager
def _lockstep(expert_dirs: list[str], options: ServerOptions,
              weights: list[float] | None = None) -> Iterator[RunningSystem]:
    with ExitStack() as stack:
        procs, logs, expert_urls = [], [], []
        for k, expert_dir in enumerate(expert_dirs):
            port = free_port()
            log = options.log_dir / f"lockstep-expert{k}-{Path(expert_dir).name}.log"
            command = vllm_serve_command(expert_dir, port, options)
            procs.append(stack.enter_context(managed_process(command, log, _env(options))))
            logs.append(log)
            expert_urls.append(f"http://127.0.0.1:{port}")
        for url in expert_urls:  # the experts start in parallel; the mixer needs all of them up
            wait_ready(url, procs, logs, options.startup_timeout_s)
        port = free_port()
        command = lockstep_mixer_command(expert_urls, expert_dirs[0], port, weights)
        log = options.log_dir / "lockstep-mixer.log"
        procs.append(stack.enter_context(managed_process(command, log, _env(options))))
        logs.append(log)
        base_url = f"http://127.0.0.1:{port}"
        model_name = wait_ready(base_url, procs, logs, options.startup_timeout_s)
        yield RunningSystem(name="lockstep", base_url=base_url, model_name=model_name, processes=procs,
                            expert_urls=expert_urls)


def launch(system: str, *, composite_dir: str | None, expert_dirs: list[str], options: ServerOptions,
           student_dir: str | None = None, lockstep_weights: list[float] | None = None,
           draft_dir: str | None = None, num_draft_tokens: int = 3, uniform_dir: str | None = None):
    """A context manager that starts ``system`` and yields a :class:`RunningSystem`."""
    expert = str(expert_dirs[0])
    if system == "draft":
        if not (composite_dir and draft_dir):
            raise ValueError("the draft system needs a composite and a draft folder")
        drafted = ["--draft", str(draft_dir), "--num-draft-tokens", str(num_draft_tokens)]
        return _single_server(system, lambda port: gatemix_serve_command(
            composite_dir, port, options, "gatemix-draft") + drafted, options, "gatemix-draft")
    gatemix_folders = {"ensemble": composite_dir, "uniform": uniform_dir, "single": expert, "student": student_dir}
    if system in gatemix_folders:
        folder = gatemix_folders[system]
        if not folder:
            raise ValueError(f"the {system} system needs a model folder")
        name = f"gatemix-{system}"
        return _single_server(system, lambda port: gatemix_serve_command(folder, port, options, name), options, name)
    if system == "vllm":
        return _single_server(system, lambda port: vllm_serve_command(expert, port, options), options)
    if system == "lockstep":
        return _lockstep([str(d) for d in expert_dirs], options, lockstep_weights)
    raise ValueError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")


SPEC_DECODE_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                        "vllm:spec_decode_num_accepted_tokens")


def spec_decode_counters(base_url: str) -> dict[str, float]:
    """vLLM's speculative-decoding totals on a server's ``/metrics`` (empty without a draft)."""
    from prometheus_client.parser import text_string_to_metric_families

    body = httpx.get(f"{base_url}/metrics", timeout=10.0).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        if family.name in SPEC_DECODE_COUNTERS:
            totals[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals


class ProcessUsage:
    """Peak resident memory (MiB) and CPU seconds of process trees while a load runs.

    Peak memory is the sum of RSS over every process in the trees (servers,
    engine cores, workers), sampled every ``interval_s``; pages shared between
    processes count once per process, as ``ps`` would show them.

    CPU seconds (user + system) are split by role: ``api_cpu_s`` for the root
    processes (the HTTP servers, which also run vLLM's output processing and
    detokenization) and ``engine_cpu_s`` for their descendants (engine cores and
    workers). Per output token, the API figure is the server's own cost and
    depends far less than tokens/s on how the cores were shared, though it falls
    when the server is behind (vLLM then merges several tokens into one chunk);
    the engine figure includes the engine core's and worker's busy-wait on
    vLLM's shared-memory queue, so it tracks wall time more than work. A
    process that exits mid-run counts up to its last sample.
    """

    def __init__(self, pids: list[int], interval_s: float = 0.2) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-usage", daemon=True)

    def _tree(self) -> list[psutil.Process]:
        procs = []
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return procs

    def sample(self, baseline: bool = False) -> float:
        """Sum of RSS now (MiB); records each process's CPU seconds so far.

        ``baseline``: this is the first sample; processes born later start from 0.
        """
        total = 0
        for proc in self._tree():
            try:
                with proc.oneshot():
                    total += proc.memory_info().rss
                    times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            cpu = times.user + times.system
            if baseline:
                self._cpu_first[proc.pid] = cpu
            self._cpu_last[proc.pid] = cpu
        return total / 2**20

    def _cpu_delta_s(self, roots: bool) -> float:
        return sum(last - self._cpu_first.get(pid, 0.0) for pid, last in self._cpu_last.items()
                   if (pid in self.pids) == roots)

    @property
    def api_cpu_s(self) -> float:
        return self._cpu_delta_s(roots=True)

    @property
    def engine_cpu_s(self) -> float:
        return self._cpu_delta_s(roots=False)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self.peak_mib = self.sample(baseline=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.sample())
