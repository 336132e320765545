"""The gate side of each choice: its trace, its engine arguments, its per-token weights.

Each choice of a composite gets a trace id; the engine's workers send the gate
weights of its tokens to the server's ``GateTraceReceiver`` under that id, and
``token_weights`` joins them to the tokens the engine returns. A plain
single-model folder has no receiver: every token is the one expert's, ``[1.0]``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from gatemix.server.choices import ChoiceState
from gatemix.server.served_models import GatePlan


@dataclass(frozen=True)
class ChoiceTrace:
    """One running choice's gate: its trace id, and the gate it was promised."""

    trace_id: str
    gate_version: str | None
    extra_args: dict  # SamplingParams.extra_args: the plan's pins and subset, and the trace


class GateTraceJoin:
    """Opens and closes each choice's trace; joins the weights the workers send to its tokens."""

    def __init__(self, *, receiver, timeout_s: float) -> None:
        self.receiver = receiver  # GateTraceReceiver, or None for a plain single-model folder
        self.timeout_s = timeout_s  # how long a token's weights may lag behind the token
        self.gates_in_flight: Counter[str] = Counter()  # gate version -> open traces (> 0)

    def gate_versions_in_flight(self) -> list[str]:
        """The gates unfinished requests were promised; a gate swap keeps them loaded."""
        return sorted(self.gates_in_flight)

    def open(self, plan: GatePlan) -> ChoiceTrace | None:
        """A choice's trace, registered when it starts to run (one that never runs holds none)."""
        if self.receiver is None:
            return None
        # The engine's request module imports torch (seconds): only a composite's server needs it.
        from gatemix.engine.request_gates import gate_request_args

        trace_id = self.receiver.new_trace_id()
        extra_args = gate_request_args(
            pinned_weights=plan.pinned_weights,
            expert_mask=plan.expert_mask,
            trace_id=trace_id,
            trace_to=self.receiver.address,
            gate_version=plan.gate_version,
        )
        if plan.gate_version is not None:
            self.gates_in_flight[plan.gate_version] += 1
        return ChoiceTrace(trace_id, plan.gate_version, extra_args)

    def close(self, trace: ChoiceTrace | None) -> None:
        if trace is None:
            return
        self.receiver.release(trace.trace_id)
        if trace.gate_version is not None:
            self.gates_in_flight[trace.gate_version] -= 1
            if not self.gates_in_flight[trace.gate_version]:
                del self.gates_in_flight[trace.gate_version]

    async def token_weights(
        self, trace: ChoiceTrace | None, state: ChoiceState, token_ids: list[int]
    ) -> list[list[float]] | None:
        """(new tokens, K) gate weights of ``token_ids``, the tokens after ``state``'s; None
        when missing (they did not arrive in time, now or for an earlier token)."""
        if trace is None:
            return [[1.0]] * len(token_ids)
        if not token_ids:
            return []
        if state.gate_weights is None:  # one missing token already makes the mean unknown
            return None
        start = len(state.token_ids)
        return await self.receiver.wait_for(
            trace.trace_id, start + len(token_ids), start=start, timeout=self.timeout_s,
            output_ids=[*state.token_ids, *token_ids],
        )
