"""Two processes under torchrun (DDP over gloo on the CPU) end where one process ends."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from gatemix.distill.train import distill, read_record


def test_two_torchrun_processes_train_the_same_student_as_one(tiny_config, tmp_path):
    config = tiny_config(steps=3, eval_every=3, checkpoint_every=3, keep="last", threads=1,
                         out_dir=str(tmp_path / "ddp"))
    flags = ["--project", config.project, "--composite-dir", config.composite_dir,
             "--out-dir", config.out_dir, "--cache-dir", config.cache_dir,
             "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "128",
             "--eval-every", "3", "--checkpoint-every", "3", "--warmup-steps", "1",
             "--lr", str(config.lr), "--keep", "last", "--threads", "1", "--no-progress"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "gatemix.cli", "distill", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("student written to") == 1  # rank 0 alone writes and reports
    two = tmp_path / "ddp"
    one = distill(tiny_config(**{**vars(config), "out_dir": str(tmp_path / "one")}))
    assert read_record(two)["world_size"] == 2 and read_record(one)["world_size"] == 1
    expected, got = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    held_one, held_two = read_record(one)["evals"][-1], read_record(two)["evals"][-1]
    assert abs(held_one["mean_kl"] - held_two["mean_kl"]) < 1e-4
