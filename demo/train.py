"""Small Llama models for the demo: config, packed data, one training loop, eval loss.

Documents are packed: each is encoded as ``<|bos|> ... <|eos|>``, all are joined
into one token stream per split, and training samples random windows of
``seq_len`` tokens from it (attention crosses document boundaries, as in usual
pretraining). Eval scores fixed, non-overlapping windows from the start of the
eval stream, so every model is scored on exactly the same tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from gatemix.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID

logger = logging.getLogger(__name__)

_ENCODE_CHUNK = 64  # documents per encode_batch call, for a live progress bar


@dataclass(frozen=True)
class LlamaShape:
    """The size of one demo model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class TrainSettings:
    """One training run: AdamW, linear warmup, cosine decay to ``min_lr_ratio``."""

    steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    seed: int


def llama_config(shape: LlamaShape, *, vocab_size: int, context_length: int) -> LlamaConfig:
    """A float32 Llama config with untied embeddings and the demo's special token ids."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=context_length,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        dtype="float32",
    )


def new_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def pack_documents(tokenizer: Tokenizer, texts: list[str], *, desc: str,
                   progress: bool) -> torch.Tensor:
    """Texts -> one ``(N,)`` int64 stream of ``<|bos|> doc <|eos|>`` runs."""
    ids: list[int] = []
    with tqdm(total=len(texts), desc=desc, unit="doc", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = texts[start:start + _ENCODE_CHUNK]
            for encoding in tokenizer.encode_batch(chunk):  # bos added by the tokenizer
                ids.extend(encoding.ids)
                ids.append(EOS_ID)
            bar.update(len(chunk))
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, batch_size: int, seq_len: int,
                   generator: torch.Generator) -> torch.Tensor:
    """``(N,)`` -> ``(batch_size, seq_len)`` windows at random offsets."""
    starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len)
    return stream[starts.unsqueeze(1) + offsets]  # (B, T)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_causal_lm(model: LlamaForCausalLM, stream: torch.Tensor, settings: TrainSettings, *,
                    desc: str, progress: bool) -> float:
    """Train ``model`` in place on random windows of ``stream``; return the mean loss
    of the last tenth of the steps (nats per token)."""
    if len(stream) < settings.seq_len:
        raise ValueError(f"{desc}: {len(stream)} tokens is less than one window "
                         f"of {settings.seq_len}")
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  betas=(0.9, 0.95), weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps=settings.steps, warmup_steps=settings.warmup_steps,
        min_ratio=settings.min_lr_ratio))
    model.train()
    losses: list[float] = []
    with tqdm(range(settings.steps), desc=desc, unit="step", disable=not progress) as bar:
        for _ in bar:
            batch = sample_windows(stream, settings.batch_size, settings.seq_len, generator)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def eval_windows(stream: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """The first non-overlapping windows of ``stream`` within ``max_tokens``:
    ``(N,) -> (W, seq_len)``; a stream shorter than one window is one short window."""
    stream = stream[:max(max_tokens, 2)]
    num_windows = len(stream) // seq_len
    if num_windows == 0:
        return stream.unsqueeze(0)
    return stream[:num_windows * seq_len].view(num_windows, seq_len)


@torch.no_grad()
def eval_loss(model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss (nats per token) over ``(W, T)`` windows."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        num_targets = batch.shape[0] * (batch.shape[1] - 1)
        total_loss += model(input_ids=batch, labels=batch).loss.item() * num_targets
        total_tokens += num_targets
    return total_loss / total_tokens
