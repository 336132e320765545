"""What the frozen experts say about the gate and eval splits, computed once and cached on disk.

For every sequence: each expert's log-prob of every next token and, when the
causal router needs them, each expert's final hidden state (after the final
norm: ``hidden_states[-1]`` in transformers), which is what the engine feeds
the router. The cache key hashes the experts' weights, the text and the
settings, so a changed expert or split never reads stale features.

Scoring shards across processes with no manual step: under ``torchrun`` (or
any launcher that sets ``RANK``/``WORLD_SIZE``) each process scores
``sequences[rank::world_size]`` on its own GPU into its own shard file, the
processes meet at a barrier, and every one of them reads the shards back,
merged in the original order, into the same full cache file a single process
would have written (``merge_shards``). Later runs, sharded or not, read that.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from gatemix.atomic_write import atomic_file
from gatemix.gate.fit.expert_bank import ExpertBank, HFExpertBank, pad_sequences
from gatemix.gate.fit.robust_sampling import draw_from_q
from gatemix.gate.token_features import TokenFeatures
from gatemix.process_rank import ProcessRank

logger = logging.getLogger(__name__)

FEATURES_VERSION = "gate-features/3"  # 2: whole documents in windows; 3: dtype in the key


def data_hash(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


def score_sequences(
    bank: ExpertBank,
    token_lists: list[list[int]],
    *,
    with_hidden: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> TokenFeatures:
    """Score sequences in length-sorted batches (less padding) and return them in input order."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if progress:
        batches = tqdm(batches, desc="expert features")
    parts = [
        bank.score(*pad_sequences([token_lists[i] for i in batch]), with_hidden=with_hidden)
        for batch in batches
    ]
    features = TokenFeatures.concat(parts)
    return features.select(torch.argsort(torch.tensor(order)))


def _save(features: TokenFeatures, path: Path) -> None:
    tensors = {
        "input_ids": features.input_ids,
        "attention_mask": features.attention_mask,
        "next_logprobs": features.next_logprobs,
        "token_mask": features.token_mask,
    }
    if features.hidden is not None:
        tensors["hidden"] = features.hidden.half()  # halves the cache; the router casts back
    with atomic_file(path) as temp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp))


def _load(path: Path) -> TokenFeatures:
    tensors = load_file(str(path))
    hidden = tensors.get("hidden")
    return TokenFeatures(
        tensors["input_ids"],
        tensors["attention_mask"],
        tensors["next_logprobs"],
        None if hidden is None else hidden.float(),
        tensors["token_mask"],
    )


def _cache_key(*parts) -> str:
    """A file name stem for cached features: the format version and everything they depend on."""
    return hashlib.sha256("|".join([FEATURES_VERSION, *map(str, parts)]).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Shard:
    """This process's part of a sharded scoring run: ``sequences[rank::world_size]``."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        """The launcher's ``RANK`` and ``WORLD_SIZE`` (``torchrun`` sets both), else one shard."""
        process = ProcessRank.from_env()
        return cls(process.rank, process.world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every shard (a no-op for one); joins ``torch.distributed`` on first use."""
        if self.world_size == 1:
            return
        if not dist.is_initialized():
            dist.init_process_group("gloo")  # CPU tensors only: a barrier needs no NCCL
        dist.barrier()


def shard_path(path: Path, shard: Shard) -> Path:
    return path.with_name(f"{path.stem}-{shard.rank}of{shard.world_size}{path.suffix}")


def merge_shards(parts: list[TokenFeatures]) -> TokenFeatures:
    """Shards ``r`` holding sequences ``r, r + W, r + 2W, ...`` -> all sequences in order."""
    world_size = len(parts)
    merged = TokenFeatures.concat(parts)
    offsets = [0]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + part.input_ids.shape[0])
    total = merged.input_ids.shape[0]
    order = [offsets[i % world_size] + i // world_size for i in range(total)]
    return merged.select(torch.tensor(order, dtype=torch.long))


def cached_features(
    bank: HFExpertBank,
    texts: list[str],
    *,
    cache_dir: str | Path,
    max_length: int,
    with_hidden: bool,
    batch_size: int = 8,
    shard: Shard | None = None,
    progress: bool = False,
) -> TokenFeatures:
    """Expert features of ``texts``, read from the disk cache or computed and stored there.

    With a ``shard`` of several processes, each scores its part and all of them
    return the merged whole (see the module docstring).
    """
    shard = shard or Shard()
    key = _cache_key(*bank.hashes, data_hash(texts), max_length, with_hidden, bank.dtype)
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        logger.info("expert features from cache %s", path)
        return _load(path)
    token_lists = bank.tokenize(texts, max_length)
    score = {"with_hidden": with_hidden, "batch_size": batch_size, "progress": progress}
    if shard.world_size == 1:
        features = score_sequences(bank, token_lists, **score)
        _save(features, path)
        return features
    own = token_lists[shard.rank :: shard.world_size]
    _save(score_sequences(bank, own, **score), shard_path(path, shard))
    shard.barrier()  # every shard written
    parts = [_load(shard_path(path, Shard(r, shard.world_size))) for r in range(shard.world_size)]
    features = merge_shards(parts)
    if shard.is_main:
        _save(features, path)
    shard.barrier()  # the merged file is complete before anyone may read it next time
    return features


def cached_proposals(
    bank: HFExpertBank,
    *,
    count: int,
    length: int,
    seed: int,
    cache_dir: str | Path,
    batch_size: int = 64,
) -> TokenFeatures:
    """``count`` sequences drawn from ``q = (1/K) sum_k pi_k``, scored by every expert, cached.

    Seeded, so the pool is a function of the experts and the settings and the
    disk copy stands for it.
    """
    key = _cache_key("q-pool", *bank.hashes, count, length, seed)
    path = Path(cache_dir) / f"q-{key}.safetensors"
    if path.is_file():
        logger.info("q samples from cache %s", path)
        return _load(path)
    generator = torch.Generator().manual_seed(seed)
    pool = draw_from_q(bank, count, length, generator, batch_size)
    _save(pool, path)
    return pool


def cached_token_features(
    bank: HFExpertBank,
    token_lists: list[list[int]],
    *,
    cache_dir: str | Path,
    with_hidden: bool,
    batch_size: int = 8,
    progress: bool = False,
) -> TokenFeatures:
    """Expert features of sequences given as token ids (built, not read: switching documents)."""
    key = _cache_key("tokens", *bank.hashes, data_hash([str(ids) for ids in token_lists]),
                     with_hidden, bank.dtype)
    path = Path(cache_dir) / f"t-{key}.safetensors"
    if path.is_file():
        logger.info("expert features from cache %s", path)
        return _load(path)
    features = score_sequences(
        bank, token_lists, with_hidden=with_hidden, batch_size=batch_size, progress=progress
    )
    _save(features, path)
    return features
