"""The distillation data: each domain's packed token stream, cut into windows, sampled by domain weight.

Documents are packed as the demo trains its models: each encoded with the
tokenizer's own special tokens (BOS where it adds one) and followed by EOS,
all of a domain's joined into one stream. The stream is cut into
non-overlapping windows of ``seq_len`` tokens on a fixed grid, so a window has
a stable id and the teacher's targets for it can be cached.

Each sequence of a batch first draws its domain from the domain weights, then
a window of that domain uniformly. The weights are uniform (the default), the
robust gate's final lambda (the worst mixture of domains the fit found, from
the router artifact's details), or the data's token proportions, optionally
mixed with uniform so that no domain is starved. Uniform is the default
because the student must hold up on every domain: lambda is the worst mixture
*for the gate*, and a fit can put almost all of it on one domain (on the tiny
demo 0.98 on docs, 0.00 on legal), which leaves the student no legal text. The sampler's
generator state is checkpointed, so a resumed run draws the batches the
uninterrupted one would have.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from gatemix.errors import UserError
from gatemix.project import Project

logger = logging.getLogger(__name__)


class DistillDataError(UserError):
    """No data to distil on, or domain weights that cannot be had; one line."""


def pack_texts(tokenizer, texts: list[str]) -> torch.Tensor:
    """Documents -> one ``(N,)`` int64 stream, each document followed by EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(texts, verbose=False)["input_ids"] if texts else []:
        ids.extend(encoded)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class WindowSet:
    """Every domain's stream cut into ``(W_d, seq_len)`` windows; window ids run across domains."""

    domains: list[str]
    windows: dict[str, torch.Tensor]  # domain -> (W_d, T)

    @classmethod
    def from_streams(cls, streams: dict[str, torch.Tensor], seq_len: int,
                     max_tokens: int | None = None) -> WindowSet:
        windows = {}
        for domain, stream in streams.items():
            stream = stream[:max_tokens] if max_tokens else stream
            count = len(stream) // seq_len
            windows[domain] = stream[: count * seq_len].view(count, seq_len)
        return cls(list(streams), windows)

    @property
    def counts(self) -> list[int]:
        return [self.windows[d].shape[0] for d in self.domains]

    @property
    def offsets(self) -> list[int]:
        offsets, total = [], 0
        for count in self.counts:
            offsets.append(total)
            total += count
        return offsets

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def seq_len(self) -> int:
        return next(iter(self.windows.values())).shape[1]

    @functools.cached_property
    def _stacked(self) -> torch.Tensor:
        return torch.cat([self.windows[d] for d in self.domains])

    def all_windows(self) -> torch.Tensor:
        """``(W, T)`` in window-id order."""
        return self._stacked

    def domain_ids(self) -> torch.Tensor:
        """``(W,)`` the domain index of every window id."""
        return torch.cat([torch.full((c,), j) for j, c in enumerate(self.counts)])

    def batch(self, window_ids: torch.Tensor) -> torch.Tensor:
        """``(B,)`` window ids -> ``(B, T)`` token ids."""
        return self.all_windows()[window_ids] if len(window_ids) else torch.zeros(
            (0, self.seq_len), dtype=torch.long)


def read_streams(project: Project, tokenizer, split: str) -> dict[str, torch.Tensor]:
    """Domain -> the packed stream of its ``split`` (empty where the project has none)."""
    streams = {}
    for domain in project.domains:
        texts = project.texts(domain, split) if project.has_split(domain, split) else []
        streams[domain] = pack_texts(tokenizer, texts)
    return streams


def train_windows(project: Project, tokenizer, seq_len: int) -> WindowSet:
    """The train windows; refuses a project whose train text holds no window at all."""
    windows = WindowSet.from_streams(read_streams(project, tokenizer, "train"), seq_len)
    if len(windows) == 0:
        raise DistillDataError(
            f"{project.path}: the train splits hold no sequence of {seq_len} tokens (empty "
            "dataset); add train text or lower --seq-len")
    return windows


def eval_windows(project: Project, tokenizer, seq_len: int, max_tokens: int) -> WindowSet:
    """The first ``max_tokens`` of each domain's eval stream, in windows; domains with none left out."""
    windows = WindowSet.from_streams(read_streams(project, tokenizer, "eval"), seq_len, max_tokens)
    missing = [d for d, count in zip(windows.domains, windows.counts) if count == 0]
    if missing:
        logger.warning("no eval window of %d tokens for %s: left out of the held-out figures",
                       seq_len, ", ".join(missing))
    kept = [d for d in windows.domains if d not in missing]
    return WindowSet(kept, {d: windows.windows[d] for d in kept})


def domain_weights(kind: str, windows: WindowSet, gate_lambda: dict[str, float] | None,
                   where: str = "", uniform_mix: float = 0.0) -> list[float]:
    """Each domain's share of the batches: ``kind`` weights, ``uniform_mix`` of uniform mixed in."""
    if kind == "lambda":
        if not gate_lambda:
            raise DistillDataError(
                f"{where}: the served gate has no fitted lambda (router details lambda_avg); "
                "run `gatemix fit-gate` or pass --domain-weights uniform or proportional")
        unknown = set(windows.domains) - set(gate_lambda)
        if unknown:
            raise DistillDataError(f"{where}: the gate's lambda has no weight for {sorted(unknown)}")
        weights = [float(gate_lambda[d]) for d in windows.domains]
    elif kind == "uniform":
        weights = [1.0] * len(windows.domains)
    elif kind == "proportional":
        weights = [float(count) for count in windows.counts]
    else:
        raise DistillDataError(f"unknown domain weights {kind!r}")
    total = sum(weights)
    if total <= 0 or any(w < 0 for w in weights):
        raise DistillDataError(f"{where}: domain weights {weights} are not a distribution")
    weights = [(1 - uniform_mix) * w / total + uniform_mix / len(weights) for w in weights]
    for domain, weight, count in zip(windows.domains, weights, windows.counts):
        if weight > 0 and count == 0:
            raise DistillDataError(
                f"{where}: domain {domain!r} has weight {weight:.3g} but no train sequence of "
                f"{windows.seq_len} tokens (empty dataset)")
    return weights


class BatchSampler:
    """Draws batches of window ids: a domain by weight for each row, then a window in it."""

    def __init__(self, windows: WindowSet, weights: list[float], seed: int) -> None:
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.counts = windows.counts
        self.offsets = windows.offsets
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` window ids and ``(B,)`` their domain indices."""
        domains = torch.multinomial(self.weights, batch_size, replacement=True,
                                    generator=self.generator)
        draws = torch.rand(batch_size, generator=self.generator, dtype=torch.float64)
        counts = torch.tensor(self.counts, dtype=torch.float64)[domains]
        within = (draws * counts).long().clamp_max(counts.long() - 1)
        return torch.tensor(self.offsets)[domains] + within, domains

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
