"""``gatemix distill`` end to end on the tiny demo: it learns, it resumes exactly, it refuses bad input."""

from __future__ import annotations

import json

import pytest
import torch
from distill_helpers import copy_model_folder
from safetensors.torch import load_file

from gatemix.cli import main
from gatemix.distill.checkpoint import CheckpointError, latest_checkpoint
from gatemix.distill.data import DistillDataError
from gatemix.distill.student import StudentError
from gatemix.distill.train import distill, read_record
from gatemix.project_writer import write_project_file


def test_a_small_run_lowers_the_heldout_kl_against_the_untrained_student(tiny_config):
    # Pure distillation (no data cross-entropy term): the KL is the whole objective here.
    student_dir = distill(tiny_config(steps=24, eval_every=8, checkpoint_every=0,
                                      label_weight=0.0))
    record = read_record(student_dir)
    untrained, *_, last = record["evals"]
    assert untrained["step"] == 0 and last["step"] == 24
    assert last["mean_kl"] < 0.8 * untrained["mean_kl"], (untrained, last)
    assert record["kept"] == "best" and record["kept_step"] == record["best_step"]
    assert len(record["history"]) == 24 and record["domain_weights"]["kind"] == "uniform"
    assert record["domain_weights"]["weights"] == pytest.approx({"code": 1 / 3, "legal": 1 / 3,
                                                                 "docs": 1 / 3})
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (student_dir / name).is_file(), name


def test_the_tv_loss_trains_a_student_on_total_variation(tiny_config):
    student_dir = distill(tiny_config(loss="tv", label_weight=0.0, steps=3, eval_every=0,
                                      checkpoint_every=0))
    record = read_record(student_dir)
    assert record["config"]["loss"] == "tv"
    assert all(0 < h["loss"] <= 1 for h in record["history"]), record["history"]  # TV in [0, 1]


class Interrupted(Exception):
    pass


def _interrupt_at(step: int):
    def on_step(current: int) -> None:
        if current == step:
            raise Interrupted

    return on_step


def test_the_resumed_run_ends_where_the_uninterrupted_run_ends(tiny_config, tmp_path):
    # On-policy rows and a top-k teacher, so every generator and both target paths are in play.
    settings = {"steps": 6, "checkpoint_every": 2, "eval_every": 3, "keep": "last",
                "on_policy_fraction": 0.25, "on_policy_prompt_tokens": 8, "teacher_top_k": 64}
    whole = distill(tiny_config(out_dir=str(tmp_path / "whole"), **settings))
    resumed_config = tiny_config(out_dir=str(tmp_path / "resumed"), **settings)
    with pytest.raises(Interrupted):
        distill(resumed_config, on_step=_interrupt_at(5))  # step 5 is lost, 4 is checkpointed
    assert latest_checkpoint(tmp_path / "resumed.run").name == "step-000004"
    resumed = distill(resumed_config)
    expected, got = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    whole_record, resumed_record = read_record(whole), read_record(resumed)
    assert resumed_record["history"] == whole_record["history"]
    assert resumed_record["evals"] == whole_record["evals"]
    # The rerun found every data window's targets in the cache the first runs wrote.
    assert resumed_record["teacher_windows_scored"] == 0


def test_a_corrupt_checkpoint_is_a_one_line_error(tiny_config, capsys):
    config = tiny_config(steps=2, checkpoint_every=1, eval_every=0)
    distill(config)
    latest = latest_checkpoint(config.out_dir + ".run")
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        distill(config)
    code = main(["distill", "--project", config.project, "--composite-dir", config.composite_dir,
                 "--out-dir", config.out_dir, "--cache-dir", config.cache_dir, "--steps", "2",
                 "--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--warmup-steps",
                 "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "corrupt checkpoint" in err, err
    assert distill(tiny_config(**{**vars(config), "resume": False, "steps": 1})).is_dir()


def test_a_checkpoint_of_other_settings_is_refused(tiny_config):
    distill(tiny_config(steps=2, checkpoint_every=1, eval_every=0))
    with pytest.raises(CheckpointError, match="other settings.*lr"):
        distill(tiny_config(steps=2, checkpoint_every=1, eval_every=0, lr=1e-2))


def test_a_student_with_another_tokenizer_is_refused(tiny_config, demo_paths, tmp_path):
    other = copy_model_folder(demo_paths.root / "base", tmp_path / "other-tokenizer")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(StudentError, match="different tokenizer") as error:
        distill(tiny_config(init="model", init_from=str(other)))
    assert "\n" not in str(error.value)
    smaller = copy_model_folder(demo_paths.root / "base", tmp_path / "other-vocab",
                                vocab_size=1024)
    with pytest.raises(StudentError, match="vocab_size 1024"):
        distill(tiny_config(init="model", init_from=str(smaller)))


def test_a_student_architecture_vllm_cannot_load_is_refused(tiny_config, demo_paths, tmp_path):
    pytest.importorskip("vllm")
    folder = copy_model_folder(demo_paths.root / "base", tmp_path / "diffllama",
                               architectures=["DiffLlamaForCausalLM"], model_type="diffllama")
    with pytest.raises(StudentError, match="DiffLlamaForCausalLM is not one the installed vLLM"):
        distill(tiny_config(init="model", init_from=str(folder)))


def _project_with_train_text(root, demo_paths, text: str | None):
    data = {}
    for domain in demo_paths.expert_dirs:
        train = root / f"{domain}-train.jsonl"
        train.write_text("" if text is None else json.dumps({"text": text}) + "\n")
        data[domain] = {"train": [str(train)],
                        "eval": [str(demo_paths.root / "data" / domain / "eval.jsonl")]}
    return write_project_file(root / "gatemix.toml", name="empty", data=data,
                              experts={k: str(v) for k, v in demo_paths.expert_dirs.items()})


def test_an_empty_dataset_is_a_one_line_error(tiny_config, demo_paths, tmp_path, capsys):
    short = _project_with_train_text(tmp_path, demo_paths, "too short for a window")
    with pytest.raises(DistillDataError, match="no sequence of 32 tokens"):
        distill(tiny_config(project=str(short)))
    (tmp_path / "empty").mkdir()
    empty = _project_with_train_text(tmp_path / "empty", demo_paths, None)
    code = main(["distill", "--project", str(empty), "--composite-dir",
                 tiny_config().composite_dir, "--seq-len", "32", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no documents" in err, err


def test_a_smaller_student_from_a_config_trains_and_saves(tiny_config):
    student_dir = distill(tiny_config(init="config", steps=2, eval_every=0,
                                      student_config="num_hidden_layers=1,intermediate_size=96"))
    config = json.loads((student_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["intermediate_size"] == 96
    assert config["architectures"] == ["LlamaForCausalLM"]
