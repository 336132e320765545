"""The GPU check runs where vLLM cannot be imported, and reports figures for every section.

The lent GPU machines have no vLLM and no pip install of gatemix, so both ways
in are run here in tiny mode on the CPU with ``import vllm`` made to fail:
the module itself, and ``bench/gpu_check.sh`` through its staged PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("features", "teacher", "mixing", "router")
# None in sys.modules makes `import vllm` raise ImportError, whatever is installed.
BLOCK_VLLM = "import sys; sys.modules['vllm'] = None"
TIMEOUT_S = 300


def _check_report(report: dict) -> None:
    assert report["failed"] == [], {name: report["sections"][name] for name in report["failed"]}
    assert report["vllm_imported"] is False
    for name in SECTIONS:
        section = report["sections"][name]
        assert section["ok"] and section["error"] is None and section["violations"] == []
        assert section["rows"], f"{name} reported no figures"
    mixing = report["sections"]["mixing"]
    forms = ["two_pass", "fused"] + (["compiled"] if mixing["figures"]["compile"] == "ok" else [])
    float32_rows = [row for row in mixing["rows"] if row["dtype"] == "float32"]
    assert float32_rows
    for row in float32_rows:
        for form in forms:
            assert row[f"{form}_error"] < 1e-4, (form, row)
            assert row[f"{form}_ms"] > 0
    for name in ("features", "teacher"):
        figures = report["sections"][name]["figures"]
        assert figures["device_ms_per_sequence"] > 0 and figures["cpu_fp32_ms_per_sequence"] > 0


def _run(command: list[str], *, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def test_gpu_check_runs_without_vllm_and_reports_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    launch = (
        f"{BLOCK_VLLM}; import runpy; "
        "runpy.run_module('gatemix.bench.gpu_check', run_name='__main__', alter_sys=True)"
    )
    command = [sys.executable, "-c", launch, "--tiny", "--device", "cpu", "--repeats", "2",
               "--out", str(out)]
    result = _run(command, cwd=tmp_path, env=dict(os.environ))
    report = json.loads(out.read_text())
    _check_report(report)
    assert report["config"]["tiny"] is True
    assert "| next-token log-prob |" in result.stdout and "failed sections: none" in result.stdout


def test_gpu_check_script_runs_from_a_plain_checkout_through_its_staged_path(tmp_path):
    # A sitecustomize on PYTHONPATH blocks vLLM in the script's interpreter; the
    # script puts its staged folder in front of it. It runs from the repo root,
    # as the device runner does, where the repo's gatemix/ could shadow the staged one.
    blocker = tmp_path / "block_vllm"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_VLLM + "\n")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(blocker),
        "OUT": str(tmp_path / "out"),
    }
    env.pop("PYTHON", None)
    _run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--tiny", "--device", "cpu",
          "--repeats", "2"], cwd=REPO_ROOT, env=env)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    _check_report(report)
    module = Path(report["environment"]["module"])
    assert module.parts[-3:] == ("gatemix", "bench", "gpu_check.py"), module
    assert not module.is_relative_to(REPO_ROOT), f"{module}: from the checkout, not the stage"
    assert not module.parents[2].exists(), "the staged folder is left behind"
