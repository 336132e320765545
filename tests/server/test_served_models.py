"""Model names and the ``mixture`` extension, without an engine."""

from __future__ import annotations

import pytest

from gatemix.server.choices import ChoiceDelta, ChoiceState
from gatemix.server.errors import APIError
from gatemix.server.protocol import MixtureRequest
from gatemix.server.served_models import ServedModels

MODELS = ServedModels("ens", ["code", "legal", "tech"], "v1", 0.0, True, "/m")


def test_ensemble_name_lets_the_gate_decide():
    plan = MODELS.plan("ens", None)
    assert plan.pinned_weights is None and plan.expert_mask is None and not plan.per_token
    assert MODELS.plan(None, None).model == "ens"


def test_expert_name_pins_a_one_hot_gate():
    assert MODELS.plan("legal", MixtureRequest(per_token=True)).pinned_weights == [0.0, 1.0, 0.0]


def test_pinned_weights_are_normalized_in_expert_order():
    plan = MODELS.plan("ens", MixtureRequest(weights={"tech": 3.0, "code": 1.0}))
    assert plan.pinned_weights == pytest.approx([0.25, 0.0, 0.75])


def test_expert_subset_becomes_a_mask():
    assert MODELS.plan("ens", MixtureRequest(experts=["tech"])).expert_mask == [False, False, True]


@pytest.mark.parametrize(
    "model, mixture, status",
    [
        ("nope", None, 404),
        ("ens", MixtureRequest(weights={"code": 0.0}), 400),
        ("ens", MixtureRequest(weights={"code": float("inf")}), 400),
        ("ens", MixtureRequest(weights={"law": 1.0}), 400),
        ("ens", MixtureRequest(experts=["law"]), 400),
        ("ens", MixtureRequest(weights={"code": 1.0}, experts=["legal"]), 400),
        ("code", MixtureRequest(weights={"code": 1.0}), 400),
    ],
)
def test_bad_model_or_mixture_is_a_client_error(model, mixture, status):
    with pytest.raises(APIError) as error:
        MODELS.plan(model, mixture)
    assert error.value.status_code == status


def test_model_list_has_the_ensemble_then_the_experts():
    assert [card.id for card in MODELS.model_list().data] == ["ens", "code", "legal", "tech"]


def test_a_model_card_is_the_lists_card_and_an_unknown_name_is_a_404():
    models = MODELS.with_draft("/models/student", 4)
    for listed in models.model_list().data:
        card = models.model_card(listed.id)
        assert card.model_dump(exclude={"created"}) == listed.model_dump(exclude={"created"})
    with pytest.raises(APIError) as error:
        models.model_card("nope")
    assert error.value.status_code == 404 and error.value.code == "model_not_found"


def test_choice_mean_weights_average_over_tokens_and_missing_weights_clear_them():
    state = ChoiceState(index=0, prompt_ids=[1])
    state.add(ChoiceDelta([5, 6], "ab", None, [[1.0, 0.0], [0.5, 0.5]], None))
    assert state.mean_weights(["a", "b"]) == {"a": 0.75, "b": 0.25}
    state.add(ChoiceDelta([7], "c", None, None, "stop"))
    assert state.mean_weights(["a", "b"]) == {} and state.finish_reason == "stop"


def test_choice_running_means_match_the_mean_of_every_token_so_far():
    experts = ["a", "b", "c"]
    deltas = [[[0.2, 0.3, 0.5]], [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], [], [[0.1, 0.1, 0.8]]]
    state, seen = ChoiceState(index=0, prompt_ids=[1]), []
    for weights in deltas:
        state.add(ChoiceDelta(list(range(len(weights))), "x", None, weights, None))
        seen += weights
        expected = {name: sum(token[k] for token in seen) / len(seen) for k, name in enumerate(experts)}
        assert state.mean_weights(experts) == pytest.approx(expected)
        assert state.weight_sums(experts) == pytest.approx({n: w * len(seen) for n, w in expected.items()})


def test_every_name_lists_the_draft_the_engine_decodes_behind():
    models = MODELS.with_draft("/models/student", 4)
    cards = models.model_list().data
    assert all(card.draft.model == "/models/student" and card.draft.num_draft_tokens == 4 for card in cards)
    assert all(card.draft is None for card in MODELS.model_list().data)


@pytest.mark.parametrize(("temperature", "refused"), [(None, True), (0.7, True), (0.0, False)])
def test_sampling_with_a_draft_is_refused_where_vllm_cannot_sample_exactly(temperature, refused, monkeypatch):
    from types import SimpleNamespace

    from gatemix.engine import engine_config
    from gatemix.server.sampling import refuse_cpu_sampling_with_draft

    monkeypatch.setattr(engine_config, "on_cpu", lambda: True)
    refuse_cpu_sampling_with_draft(SimpleNamespace(speculative_config=None), {"temperature": temperature})
    with_draft = SimpleNamespace(speculative_config=object())
    if not refused:
        refuse_cpu_sampling_with_draft(with_draft, {"temperature": temperature})
        return
    with pytest.raises(APIError) as error:
        refuse_cpu_sampling_with_draft(with_draft, {"temperature": temperature})
    assert error.value.status_code == 400 and error.value.param == "temperature"
    monkeypatch.setattr(engine_config, "on_cpu", lambda: False)
    refuse_cpu_sampling_with_draft(with_draft, {"temperature": temperature})
