"""Packing: writing a composite folder from expert folders and a gate, or from a project.

All checks (tokenizers, architectures the installed vLLM builds, one attention
pattern, the router's shapes) run before anything is written, and the folder is
written beside its target and renamed into place. The format itself, and its
reading, is ``gatemix.engine.composite_folder``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from gatemix.atomic_write import atomic_folder
from gatemix.engine.composite_folder import (
    COMPOSITE_ARCHITECTURE,
    COMPOSITE_FORMAT,
    GATE_SUBDIR,
    CompositeInfo,
    PackError,
    expert_config_dir,
)
from gatemix.expert_folder import ExpertFolder, ExpertFolderError, check_compatible, read_expert
from gatemix.gate.artifact import (
    ArtifactError,
    RouterArtifact,
    load_router,
    save_router,
)
from gatemix.gate.router import check_context_fits, constant_router

logger = logging.getLogger(__name__)

# Fields that must agree for the engine to run the experts side by side (vLLM reads
# one quantization method and one context length for the whole model).
ENGINE_SHARED_FIELDS = ("quantization_config",)
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def expert_hidden_sizes(experts: list[ExpertFolder]) -> list[int]:
    """Each expert's final hidden size, which the router reads."""
    sizes = []
    for expert in experts:
        size = expert.config.get("hidden_size")
        if not isinstance(size, int):
            raise PackError(f"{expert.path}: config.json has no integer hidden_size")
        sizes.append(size)
    return sizes


def check_vllm_supports(experts: list[ExpertFolder]) -> None:
    """Refuse an expert whose architecture vLLM has no class for (checked where vLLM is installed)."""
    try:
        from vllm import ModelRegistry
    except ImportError:  # packing on a machine without vLLM: the engine checks at start-up
        return
    supported = set(ModelRegistry.get_supported_archs())
    for expert in experts:
        if expert.architecture not in supported:
            raise PackError(
                f"{expert.path}: architecture {expert.architecture} is not supported by the "
                "installed vLLM, which builds every expert from its own model class"
            )


def attention_pattern(config: dict) -> tuple[tuple[str, ...], int | None]:
    """``(kinds of attention layer, sliding window)`` of an expert's config.

    Experts of different widths, depths, head counts and head sizes share one
    engine (vLLM keeps one KV-cache group of full-attention layers of any
    shape). A sliding-window expert beside a full-attention one needs a second
    group, and there the CPU backend's mixture was wrong on prompts longer than
    the window (while each expert alone was exact), so experts must share one
    pattern: all full attention, or all the same window.
    """
    window = config.get("sliding_window")
    if config.get("use_sliding_window") is False:  # Qwen2/Qwen3 carry a window they do not use
        window = None
    kinds = set(config.get("layer_types") or [])
    if not kinds:
        kinds = {"sliding_attention" if window else "full_attention"}
    return tuple(sorted(kinds)), window if "sliding_attention" in kinds else None


def check_engine_compatible(experts: list[ExpertFolder]) -> None:
    """Refuse experts one engine cannot hold side by side, with the reason."""
    check_vllm_supports(experts)
    first = experts[0]
    for other in experts[1:]:
        if attention_pattern(first.config) != attention_pattern(other.config):
            raise PackError(
                f"experts {first.name!r} and {other.name!r} use different attention patterns "
                f"({attention_pattern(first.config)} vs {attention_pattern(other.config)}); one "
                "engine holds experts that all use full attention or all the same sliding window"
            )
        for field in ENGINE_SHARED_FIELDS:
            if first.config.get(field) != other.config.get(field):
                raise PackError(
                    f"experts {first.name!r} and {other.name!r} differ in {field} "
                    f"({first.config.get(field)!r} vs {other.config.get(field)!r}); "
                    "one engine runs one quantization method"
                )


def check_router_fits(artifact: RouterArtifact, experts: list[ExpertFolder]) -> None:
    """Refuse a router whose shapes the composite cannot run with these experts."""
    widths = tuple(expert_hidden_sizes(experts))
    if artifact.router.form.expert_widths != widths:
        raise PackError(f"router reads hidden sizes {artifact.router.form.expert_widths}, experts have {widths}")
    try:
        check_context_fits(artifact.router.form.context_config, experts[0].config)
    except ValueError as exc:
        raise PackError(str(exc)) from exc


def parse_gate_spec(spec: str | None, experts: list[ExpertFolder]) -> RouterArtifact:
    """``None``/"uniform", "name=w,..." or "w1,w2,..." -> a constant router; else an artifact folder."""
    names = [expert.name for expert in experts]
    hashes = {expert.name: expert.weights_hash for expert in experts}
    hidden_sizes = expert_hidden_sizes(experts)
    if spec is None or spec == "uniform":
        weights = [1.0] * len(names)
    elif Path(spec).is_dir():
        try:
            artifact = load_router(spec)
            artifact.check_experts(names, hashes)
        except ArtifactError as exc:
            raise PackError(str(exc)) from exc
        check_router_fits(artifact, experts)
        return artifact
    else:
        weights = _parse_weights(spec, names)
    try:
        router = constant_router(weights, hidden_sizes)
    except ValueError as exc:
        raise PackError(f"gate {spec!r}: {exc}") from exc
    return RouterArtifact(router=router, expert_names=names, expert_hashes=hashes, method="constant")


def _parse_weights(spec: str, names: list[str]) -> list[float]:
    try:
        if "=" in spec:
            pairs = {name: float(weight) for name, weight in (item.split("=", 1) for item in spec.split(","))}
        else:
            weights = [float(item) for item in spec.split(",")]
    except ValueError as exc:
        raise PackError(f"gate {spec!r} is not a folder, 'uniform', or a list of weights") from exc
    if "=" in spec:
        unknown = set(pairs) - set(names)
        if unknown:
            raise PackError(f"gate names unknown experts {sorted(unknown)}; experts are {names}")
        return [pairs.get(name, 0.0) for name in names]
    if len(weights) != len(names):
        raise PackError(f"gate has {len(weights)} weights for {len(names)} experts")
    return weights


def pack_composite(
    expert_paths: list[str | Path],
    out_dir: str | Path,
    gate: str | RouterArtifact | None = None,
    names: list[str] | None = None,
    overwrite: bool = False,
) -> CompositeInfo:
    """Write one composite folder from expert folders; all checks run before any write."""
    out_dir = Path(out_dir)
    if names is not None and len(names) != len(expert_paths):
        raise PackError(f"{len(names)} names for {len(expert_paths)} experts")
    try:
        experts = [read_expert(p, names[i] if names else None) for i, p in enumerate(expert_paths)]
        check_compatible(experts)
        check_engine_compatible(experts)
    except ExpertFolderError as exc:
        raise PackError(str(exc)) from exc
    artifact = write_composite_folder(experts, gate, out_dir, overwrite, _write_composite)
    logger.info("packed %d experts into %s (gate %s)", len(experts), out_dir, artifact.version)
    return CompositeInfo.read(out_dir)


def write_composite_folder(experts: list, gate: str | RouterArtifact | None, out_dir: Path, overwrite: bool,
                           write: Callable[[list, RouterArtifact, Path], None]) -> RouterArtifact:
    """The gate checked against the experts and ``out_dir`` refused if it exists, then ``write(experts,
    artifact, staging)`` into a staging folder that replaces ``out_dir`` only once it is whole."""
    artifact = gate if isinstance(gate, RouterArtifact) else parse_gate_spec(gate, experts)
    check_router_fits(artifact, experts)
    if out_dir.exists() and not overwrite:
        raise PackError(f"{out_dir} exists; pass --overwrite to replace it")
    with atomic_folder(out_dir) as staging:
        write(experts, artifact, staging)
    return artifact


def _write_composite(experts: list[ExpertFolder], artifact: RouterArtifact, staging: Path) -> None:
    weight_map: dict[str, str] = {}
    total_size = 0
    for index, expert in enumerate(experts):
        file_name = f"experts-{index + 1:05d}-of-{len(experts):05d}.safetensors"
        tensors = {}
        for weights in expert.weight_files:
            with safe_open(str(weights), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    tensors[f"experts.{index}.{key}"] = handle.get_tensor(key)
        save_file(tensors, str(staging / file_name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = file_name
            total_size += tensor.numel() * tensor.element_size()
        del tensors
    index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    save_router(artifact, staging / GATE_SUBDIR)
    for index, expert in enumerate(experts):
        config_dir = expert_config_dir(staging, index)
        config_dir.mkdir(parents=True)
        shutil.copy2(expert.path / "config.json", config_dir / "config.json")
    (staging / "config.json").write_text(json.dumps(composite_config(experts, artifact), indent=2))
    for name in COPIED_FILES:
        source = experts[0].path / name
        if source.is_file():
            shutil.copy2(source, staging / name)


def composite_config(experts: list[ExpertFolder], artifact: RouterArtifact) -> dict:
    """The composite's config.json: the first expert's, as vLLM reads it, plus the gatemix block.

    vLLM sizes the context from this config alone, so it carries the shortest
    context any expert supports.
    """
    config = dict(experts[0].config)
    config["architectures"] = [COMPOSITE_ARCHITECTURE]
    lengths = [e.config["max_position_embeddings"] for e in experts if "max_position_embeddings" in e.config]
    if lengths:
        config["max_position_embeddings"] = min(lengths)
    config["gatemix"] = {
        "format": COMPOSITE_FORMAT,
        "expert_names": [expert.name for expert in experts],
        "expert_hashes": {expert.name: expert.weights_hash for expert in experts},
        "expert_architectures": [expert.architecture for expert in experts],
        "expert_hidden_sizes": expert_hidden_sizes(experts),
        "gate_version": artifact.version,
    }
    return config
