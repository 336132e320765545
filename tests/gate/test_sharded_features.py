"""Feature scoring sharded across processes, merged with no manual step.

``merge_shards`` on tensors, then the real thing: ``gatemix fit-gate`` under
``torchrun`` with two CPU processes (gloo), whose merged cache must equal what
one process computes, and whose rank 0 alone writes the artifact.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from micro_demo import micro_demo_project

from gatemix.gate.fit.features import Shard, merge_shards, shard_path
from gatemix.gate.token_features import TokenFeatures

FIT = [
    "--steps", "6", "--batch-per-domain", "4", "--max-length", "12", "--gate-width", "8",
    "--gate-layers", "1", "--gate-heads", "2", "--sample-length", "6", "--q-samples", "16",
    "--distill-samples", "8", "--distill-steps", "4", "--distill-batch-size", "4",
    "--torch-threads", "1", "--no-evaluate", "--device", "cpu",
]


def _features(lengths: list[int]) -> TokenFeatures:
    """One sequence per length; every value says which sequence it belongs to."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length], mask[row, :length] = row + 10, 1
    logprobs = ids[:, 1:, None].float().repeat(1, 1, 2)
    return TokenFeatures(ids, mask, logprobs, None, mask[:, 1:].float())


def test_merged_shards_are_the_unsharded_sequences_in_order():
    whole = _features([3, 5, 2, 4, 6, 3, 2])
    parts = [whole.select(torch.arange(rank, 7, 3)) for rank in range(3)]
    merged = merge_shards(parts)
    for row in range(7):
        length = int(whole.attention_mask[row].sum())
        assert torch.equal(merged.input_ids[row, :length], whole.input_ids[row, :length])
        assert torch.equal(merged.attention_mask[row, :length], whole.attention_mask[row, :length])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_fit_gate_under_torchrun_shards_the_scoring_and_merges_it(tmp_path):
    from gatemix.gate.fit.expert_bank import HFExpertBank
    from gatemix.gate.fit.features import cached_features
    from gatemix.project import load_project

    root = micro_demo_project(tmp_path / "micro")
    sharded_cache = tmp_path / "sharded-cache"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "gatemix.cli", "fit-gate", "--project", str(root), "--cache-dir", str(sharded_cache), *FIT,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("router ") == 1  # rank 0 alone fits and writes
    project = load_project(root)
    assert (project.gate_dir / "router.json").is_file()

    shards = sorted(p.name for p in sharded_cache.glob("*of2.safetensors"))
    assert len(shards) == 2 * len(project.domains)  # each domain's gate split, in two shards
    merged_files = {p for p in sharded_cache.glob("*.safetensors") if "of2" not in p.name}
    assert len([p for p in merged_files if not p.name.startswith("q-")]) == len(project.domains)
    bank = HFExpertBank(list(project.experts.values()))
    for domain in project.domains:
        single = cached_features(
            bank, project.texts(domain, "gate"), cache_dir=tmp_path / "single-cache", max_length=12,
            with_hidden=True,
        )
        merged = cached_features(  # read from the merged file the sharded run left
            bank, project.texts(domain, "gate"), cache_dir=sharded_cache, max_length=12, with_hidden=True,
        )
        assert set(sharded_cache.glob("*.safetensors")) == merged_files | {sharded_cache / n for n in shards}
        assert torch.equal(merged.input_ids, single.input_ids)
        assert torch.allclose(merged.next_logprobs, single.next_logprobs, atol=1e-5)
        assert torch.allclose(merged.hidden, single.hidden, atol=1e-2)  # cached in fp16
    assert shard_path(sharded_cache / "x.safetensors", Shard(1, 2)).name == "x-1of2.safetensors"
