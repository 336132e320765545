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
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gatemix.expert_folder import expert_hash
from gatemix.gate.distill_router import TokenFeatures

logger = logging.getLogger(__name__)

FEATURES_VERSION = "gate-features/3"  # 2: whole documents in windows; 3: dtype in the key


def data_hash(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


class HFExpertBank:
    """K Hugging Face causal LMs sharing one tokenizer, behind the ``ExpertBank`` protocol."""

    def __init__(
        self,
        expert_dirs: list[str | Path],
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.expert_dirs = [Path(path) for path in expert_dirs]
        self.tokenizer = AutoTokenizer.from_pretrained(self.expert_dirs[0])
        self.models = [
            AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
            for path in self.expert_dirs
        ]
        self.device = device
        self.dtype = dtype
        self.num_experts = len(self.models)
        self.hidden_sizes = [model.config.hidden_size for model in self.models]
        self.hashes = [expert_hash(path) for path in self.expert_dirs]
        self.with_hidden = True

    def tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Every text cut into windows of at most ``max_length`` tokens, each led by BOS.

        Whole documents, not their first window only: the demo's documents run
        to thousands of tokens, and truncation would throw most of each split away.
        """
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        start = self._start_token()
        step = max_length - 1
        windows = []
        for ids in encoded:
            for offset in range(0, len(ids), step):
                window = [start, *ids[offset : offset + step]]
                if len(window) >= 2:  # a sequence needs one scored token
                    windows.append(window)
        return windows

    def token_stream(self, texts: list[str]) -> list[int]:
        """The texts' tokens joined into one stream, each document followed by EOS (when there is one)."""
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        stream: list[int] = []
        for ids in encoded:
            stream += ids if eos is None else [*ids, int(eos)]
        return stream

    def start_token(self) -> int:
        return self._start_token()

    def _start_token(self) -> int:
        for token in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, 0):
            if token is not None:
                return int(token)
        return 0

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TokenFeatures:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        logprobs, hidden = [], []
        for model in self.models:
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=self.with_hidden,
            )
            token_logprobs = torch.log_softmax(out.logits[:, :-1].float(), -1)
            logprobs.append(token_logprobs.gather(-1, input_ids[:, 1:, None]))  # (B, T-1, 1)
            if self.with_hidden:
                hidden.append(out.hidden_states[-1][:, :-1].float())  # (B, T-1, H)
        token_mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).float().cpu()
        next_logprobs = torch.cat(logprobs, -1).cpu().masked_fill(token_mask[..., None] == 0, 0.0)
        return TokenFeatures(
            input_ids.cpu(),
            attention_mask.cpu(),
            next_logprobs,
            torch.cat(hidden, -1).cpu() if self.with_hidden else None,
            token_mask,
        )

    @torch.no_grad()
    def sample(
        self, expert: int, num: int, length: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral samples at temperature 1 from one expert; tokens after EOS are masked."""
        model = self.models[expert]
        input_ids = torch.full((num, 1), self._start_token(), device=self.device)
        out = model(input_ids=input_ids, use_cache=True)
        for _ in range(length):
            probs = torch.softmax(out.logits[:, -1].double().cpu(), -1)
            next_ids = torch.multinomial(probs, 1, generator=generator).to(self.device)
            input_ids = torch.cat([input_ids, next_ids], 1)
            out = model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)
        attention_mask = torch.ones_like(input_ids)
        eos = self.tokenizer.eos_token_id
        if eos is not None:
            is_eos = (input_ids[:, 1:] == eos).long()
            after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
            attention_mask[:, 1:] = (~after_eos).long()
        return input_ids.cpu(), attention_mask.cpu()


def pad_sequences(
    token_lists: list[list[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(N, T)`` ids and mask."""
    width = max(len(ids) for ids in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def score_sequences(
    bank, token_lists: list[list[int]], *, batch_size: int = 8, progress: bool = False
) -> TokenFeatures:
    """Score sequences in length-sorted batches (less padding) and return them in input order."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="expert features")
    parts = [bank.score(*pad_sequences([token_lists[i] for i in batch])) for batch in batches]
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


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
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every shard (a no-op for one); joins ``torch.distributed`` on first use."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

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
    bank.with_hidden = with_hidden
    if shard.world_size == 1:
        features = score_sequences(bank, token_lists, batch_size=batch_size, progress=progress)
        _save(features, path)
        return features
    own = token_lists[shard.rank :: shard.world_size]
    _save(score_sequences(bank, own, batch_size=batch_size, progress=progress), shard_path(path, shard))
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
    from gatemix.gate.distill_router import draw_from_q

    key = _cache_key("q-pool", *bank.hashes, count, length, seed)
    path = Path(cache_dir) / f"q-{key}.safetensors"
    if path.is_file():
        logger.info("q samples from cache %s", path)
        return _load(path)
    bank.with_hidden = True
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
    bank.with_hidden = with_hidden
    features = score_sequences(bank, token_lists, batch_size=batch_size, progress=progress)
    _save(features, path)
    return features
