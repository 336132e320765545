"""Bad project input refused by every job: one line naming the file, exit 2, nothing written.

Each case is run through the ``gatemix`` command itself (in process), for the
jobs that read that part of the project: the experts are read by fit-gate,
pack, distill and serve, the data by fit-gate and distill.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lora_builders import copy_adapter, write_lora_family
from project_builders import numbered_docs, write_expert, write_jsonl

from gatemix.cli import main

EXPERT_JOBS = (["fit-gate", "--project"], ["pack", "--project"], ["distill", "--project"], ["serve", "--project"])
DATA_JOBS = (["fit-gate", "--project"], ["distill", "--project"])


def _project(root: Path, experts: dict[str, Path], data: dict[str, str], base: Path | None = None) -> Path:
    lines = ['name = "bad"', *(["", "[base]", f'path = "{base}"'] if base else []), "", "[experts]"]
    lines += [f'{name} = "{folder}"' for name, folder in experts.items()]
    for domain, body in data.items():
        lines += ["", f"[data.{domain}]", body]
    path = root / "gatemix.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _good_data(root: Path, name: str) -> str:
    for split in ("train", "gate", "eval"):
        write_jsonl(root / "data" / name / f"{split}.jsonl", numbered_docs(4, name))
    return "\n".join(f'{split} = ["data/{name}/{split}.jsonl"]' for split in ("train", "gate", "eval"))


def _case(root: Path, case: str) -> tuple[Path, list[str]]:
    """(project file, what the message must name) for one bad input."""
    code = write_expert(root / "models" / "code")
    data = {"code": _good_data(root, "code")}
    experts = {"code": code}
    if case == "missing expert folder":
        experts["legal"] = root / "models" / "nowhere"
        data["legal"] = _good_data(root, "legal")
        return _project(root, experts, data), ["nowhere", "does not exist"]
    if case == "not a causal LM":
        experts["legal"] = write_expert(root / "models" / "legal", architectures=["BertForMaskedLM"])
        data["legal"] = _good_data(root, "legal")
        return _project(root, experts, data), ["legal", "not a causal language model"]
    if case == "different tokenizers":
        experts["legal"] = write_expert(root / "models" / "legal", tokenizer_model="other")
        data["legal"] = _good_data(root, "legal")
        return _project(root, experts, data), ["different tokenizers"]
    if case == "different vocabularies":
        experts["legal"] = write_expert(root / "models" / "legal", vocab_size=301)
        data["legal"] = _good_data(root, "legal")
        return _project(root, experts, data), ["vocab_size"]
    if case == "domain with no expert":
        data["poetry"] = _good_data(root, "poetry")
        return _project(root, experts, data), ["[data.poetry]", "names no expert"]
    if case == "expert with no domain":
        experts["legal"] = write_expert(root / "models" / "legal")
        return _project(root, experts, data), ["'legal'", "has no data"]
    # Data cases spoil every split: fit-gate reads gate (and eval), distill reads train.
    if case == "empty domain":
        for split in ("train", "gate", "eval"):
            (root / "data" / "code" / f"{split}.jsonl").write_text("\n\n")
        return _project(root, experts, data), ["data/code/", "no documents"]
    if case == "no text field":
        for split in ("train", "gate", "eval"):
            write_jsonl(root / "data" / "code" / f"{split}.jsonl", [{"content": "no text field here"}])
        return _project(root, experts, data), ["data/code/", "'text'"]
    raise AssertionError(case)


# LoRA cases: (what the message must name), each a project of adapter experts gone wrong.
LORA_CASES = {
    "full and adapter experts": ["full models", "LoRA adapters", "not both"],
    "base without adapters": ["no expert is a LoRA adapter folder"],
    "adapter of another base": ["of-other", "whose weights differ"],
    "missing base": ["nowhere", "does not exist"],
    "base on a hub": ["someorg/some-model", "not a local folder"],
    "target modules the base lacks": ["['c_attn']", "are not among"],
    "not LoRA": ["adapter type 'IA3'", "only LoRA adapters"],
}


def _lora_case(root: Path, family: dict[str, Path], case: str) -> tuple[Path, list[str]]:
    """(project file, what the message must name) for one bad LoRA input."""
    data = {"code": _good_data(root, "code"), "legal": _good_data(root, "legal")}
    experts, base = {"code": family["attention"], "legal": family["every-linear"]}, family["base"]
    if case == "full and adapter experts":
        experts["legal"] = family["base"]
    elif case == "base without adapters":
        experts = {"code": family["base"], "legal": family["other-base"]}
    elif case == "adapter of another base":
        experts["legal"] = family["of-other"]
    elif case == "missing base":
        base = root / "nowhere"
    elif case == "base on a hub":
        experts["code"] = copy_adapter(family["attention"], root / "hub", base_model_name_or_path="someorg/some-model")
        base = None
    elif case == "target modules the base lacks":
        experts["code"] = copy_adapter(family["attention"], root / "gpt2", target_modules=["c_attn"])
    elif case == "not LoRA":
        experts["code"] = copy_adapter(family["attention"], root / "ia3", peft_type="IA3")
    return _project(root, experts, data, base), [*LORA_CASES[case], str(root / "gatemix.toml")]


def _refused(argv: list[str], root: Path, named: list[str], capsys) -> None:
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(root / "gatemix.toml") in err, err
    for fragment in named:
        assert fragment in err, (fragment, err)
    after = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert after == before  # nothing half-written: no work folder, no cache, no composite


@pytest.mark.parametrize("case", ["missing expert folder", "not a causal LM", "different tokenizers",
                                  "different vocabularies", "domain with no expert", "expert with no domain"])
@pytest.mark.parametrize("job", EXPERT_JOBS, ids=lambda job: job[0])
def test_bad_experts_are_refused_by_every_job(case, job, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project, named = _case(tmp_path, case)
    _refused([*job, str(project)], tmp_path, named, capsys)


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory) -> dict[str, Path]:
    return write_lora_family(tmp_path_factory.mktemp("lora-family"))


@pytest.mark.parametrize("case", list(LORA_CASES))
@pytest.mark.parametrize("job", EXPERT_JOBS, ids=lambda job: job[0])
def test_bad_lora_experts_are_refused_by_every_job(case, job, lora_family, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project, named = _lora_case(tmp_path, lora_family, case)
    _refused([*job, str(project)], tmp_path, named, capsys)


@pytest.mark.parametrize("case", ["empty domain", "no text field"])
@pytest.mark.parametrize("job", DATA_JOBS, ids=lambda job: job[0])
def test_bad_data_is_refused_by_the_jobs_that_read_it(case, job, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project, named = _case(tmp_path, case)
    _refused([*job, str(project)], tmp_path, named, capsys)


def test_a_missing_project_file_is_one_line(tmp_path, capsys):
    assert main(["fit-gate", "--project", str(tmp_path / "absent.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.toml" in err and "does not exist" in err


def test_the_demo_project_names_the_demo_folders(demo_paths, demo_project):
    """The demo is a project like any other: its experts, data and baselines come from its file."""
    assert demo_project.domains == list(demo_paths.expert_dirs)
    assert demo_project.experts == {name: path for name, path in demo_paths.expert_dirs.items()}
    assert demo_project.work_dir == demo_paths.root and demo_project.name == "gatemix-demo"
    assert demo_project.baselines == demo_paths.baseline_dirs  # built only with --with-baselines
    assert demo_project.out_of_domain_texts()  # the demo's text of no domain (changelogs)
    for domain in demo_project.domains:
        stored = [json.loads(line)["text"] for line in
                  (demo_paths.data_dir / domain / "gate.jsonl").read_text().splitlines() if line.strip()]
        assert demo_project.texts(domain, "gate") == stored
