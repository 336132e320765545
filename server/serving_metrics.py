"""What serving records: the engine requests waiting, running and aborted, and each
finished choice's gate and timing (``GateMetrics``, the Prometheus side)."""

from __future__ import annotations

from gatemix.server.choices import ChoiceState, ChoiceTiming
from gatemix.server.served_models import GatePlan


class ServingMetrics:
    """Counts for ``/health``, kept in step with the Prometheus gauges; per-choice observations."""

    def __init__(self, *, metrics, expert_names: list[str]) -> None:
        self.metrics = metrics  # GateMetrics
        self.expert_names = list(expert_names)  # a gate swap keeps the experts and their order
        self.waiting = 0  # engine requests submitted, no token yet
        self.running = 0  # engine requests producing tokens
        self.aborted = 0  # engine requests aborted (client gone, or an error)

    def submitted(self) -> None:
        self._set_queue(waiting=+1)

    def started(self) -> None:
        self._set_queue(waiting=-1, running=+1)

    def ended(self, *, started: bool, finished: bool) -> None:
        """The engine request is gone: finished, or aborted (``finished`` False)."""
        self._set_queue(waiting=0 if started else -1, running=-1 if started else 0)
        if not finished:
            self.aborted += 1

    def observe_choice(self, state: ChoiceState, plan: GatePlan, timing: ChoiceTiming) -> None:
        experts = self.expert_names
        self.metrics.observe_request(
            model=plan.model,
            mean_weights=state.mean_weights(experts),
            token_weight_sums=state.weight_sums(experts),
            prompt_tokens=len(state.prompt_ids),
            generation_tokens=len(state.token_ids),
            ttft_s=timing.ttft_s if state.token_ids else None,
            itl_s=timing.itl_s if state.token_ids else [],
            e2e_s=timing.last - timing.arrival,
            draft_acceptance=state.draft_acceptance,
        )

    def _set_queue(self, waiting: int = 0, running: int = 0) -> None:
        self.waiting += waiting
        self.running += running
        self.metrics.set_queue(self.running, self.waiting)
