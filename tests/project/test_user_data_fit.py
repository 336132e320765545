"""A user's own data, in every form a project accepts, through fit-gate to a composite.

The demo's experts stand in for a user's; their text is rewritten into the
forms users already have: a Parquet file that is split by document with the
seed (code), JSONL with another text field (legal), a folder of plain text
files and a ``datasets`` dataset saved to disk (docs). ``fit_gate`` reads them
through the project file and writes a router artifact that ``gatemix pack
--project`` accepts and packs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import run_gatemix

TINY_FIT = {
    "steps": 8, "batch_per_domain": 4, "max_length": 32, "max_sequences": 10, "gate_width": 8, "gate_layers": 1,
    "gate_heads": 2, "sample_length": 6, "q_samples": 16, "distill_samples": 8, "distill_steps": 10,
    "distill_batch_size": 4, "torch_threads": 1, "evaluate": False,
}


def _user_data(root: Path, demo_project) -> dict:
    """The demo's documents in four forms; returns the project's [data] tables."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    code = [text for split in ("train", "gate", "eval") for text in demo_project.texts("code", split)]
    pq.write_table(pa.table({"content": code[:60]}), root / "code.parquet")

    legal = root / "legal"
    legal.mkdir()
    for split in ("gate", "eval"):
        lines = [json.dumps({"body": text, "id": i}) for i, text in enumerate(demo_project.texts("legal", split))]
        (legal / f"{split}.jsonl").write_text("\n".join(lines) + "\n")

    docs_gate = root / "docs-gate"
    docs_gate.mkdir()
    for index, text in enumerate(demo_project.texts("docs", "gate")):
        (docs_gate / f"page-{index:03d}.txt").write_text(text)
    datasets.Dataset.from_dict({"text": demo_project.texts("docs", "eval")}).save_to_disk(str(root / "docs-eval"))
    return {
        "code": {"files": [{"path": str(root / "code.parquet"), "text_field": "content"}]},
        "legal": {
            "gate": [str(legal / "gate.jsonl")], "eval": [str(legal / "eval.jsonl")], "text_field": "body",
        },
        "docs": {"gate": [str(docs_gate)], "eval": [str(root / "docs-eval")]},
    }


@pytest.mark.slow
def test_every_data_form_goes_through_fit_gate_to_a_packed_composite(demo_paths, demo_project, tmp_path):
    from gatemix.engine.composite_folder import CompositeInfo
    from gatemix.gate.artifact import load_router
    from gatemix.gate.fit.config import FitGateConfig
    from gatemix.gate.fit.pipeline import fit_gate
    from gatemix.project import load_project
    from gatemix.project_writer import write_project_file

    project_file = write_project_file(
        tmp_path / "gatemix.toml", name="user-ensemble", experts=demo_paths.expert_dirs,
        data=_user_data(tmp_path, demo_project),
    )
    project = load_project(project_file)
    assert [len(project.texts(d, "gate")) > 0 for d in project.domains] == [True] * 3
    code_splits = {split: {i for i, _ in project.documents("code", split)} for split in ("train", "gate", "eval")}
    assert all(code_splits.values()) and not (code_splits["gate"] & code_splits["eval"])

    artifact = fit_gate(FitGateConfig(project=str(project_file), **TINY_FIT))
    assert load_router(project.gate_dir).version == artifact.version
    record = json.loads((project.gate_dir / "fit" / "splits.json").read_text())
    assert set(record["splits"]["code"]) == {"train", "gate", "eval"}  # the pool, split and recorded
    assert all(entry["sha256"] for entry in record["splits"]["code"]["gate"])

    result = run_gatemix("pack", "--project", str(project_file))
    assert result.returncode == 0, result.stderr
    info = CompositeInfo.read(project.composite_dir)
    assert info.gate_version == artifact.version and info.gate_method == "robust"
    assert info.expert_names == ["code", "legal", "docs"]
