"""The process's lifetime: serve, drain on SIGTERM, exit when the engine dies.

A supervisor (Kubernetes, systemd, Docker's restart policy) can only restart a
server that exits, so the server never outlives its engine: a watchdog polls
``AsyncLLM.errored`` (vLLM's output handler and engine-core monitor set it when
the core process dies) and ends the process with ``EXIT_ENGINE_DEAD`` (4), as
vLLM's own api_server does. ``SIGTERM`` (or ``SIGINT``) stops accepting
connections and lets in-flight requests finish for ``shutdown_timeout_s``;
uvicorn then cancels what is left, which aborts its engine requests. Should
anything still hang (an engine that will not shut down), a timer thread ends
the process: a shutdown never outlasts its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading

import uvicorn

logger = logging.getLogger(__name__)

EXIT_ENGINE_DEAD = 4
STARTUP_FAILURE = 3  # uvicorn's own status for a lifespan that failed to start
# After the drain: time for the lifespan to shut the engine and the trace receiver down.
SHUTDOWN_GRACE_S = 10.0
# A dead engine finishes nothing: its in-flight requests fail at once, so the drain is short.
ENGINE_DEAD_DRAIN_S = 1.0


class Lifecycle:
    """What the app knows of its process: the exit status, and how to ask for an exit."""

    def __init__(self) -> None:
        self.exit_code = 0
        self.server: GatemixServer | None = None  # set by ``serve``; None under a test client

    def request_exit(self, code: int, drain_s: float | None = None) -> None:
        self.exit_code = self.exit_code or code
        if self.server is None:
            signal.raise_signal(signal.SIGTERM)
            return
        if drain_s is not None:
            self.server.config.timeout_graceful_shutdown = drain_s
        self.server.should_exit = True


class GatemixServer(uvicorn.Server):
    """uvicorn's server, with a hard deadline on its shutdown."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self._hard_exit: threading.Timer | None = None

    async def shutdown(self, sockets=None) -> None:
        drain = self.config.timeout_graceful_shutdown or 0.0
        deadline = drain + SHUTDOWN_GRACE_S
        logger.info("shutting down: %.0f s for in-flight requests, at most %.0f s in all", drain, deadline)
        self._hard_exit = threading.Timer(deadline, self._exit_now, args=(deadline,))
        self._hard_exit.daemon = True
        self._hard_exit.start()
        await super().shutdown(sockets)

    def _exit_now(self, deadline: float) -> None:
        logger.error("shutdown took more than %.0f s; exiting now", deadline)
        os._exit(self.lifecycle.exit_code or 1)


async def watch_engine(engine, lifecycle: Lifecycle, interval_s: float) -> None:
    """Poll the engine; when its core has died, end the process for a supervisor to restart."""
    while True:
        await asyncio.sleep(interval_s)
        if engine.errored:
            logger.error(
                "the engine core has died; exiting with status %d for a supervisor to restart "
                "the server",
                EXIT_ENGINE_DEAD,
            )
            lifecycle.request_exit(EXIT_ENGINE_DEAD, drain_s=ENGINE_DEAD_DRAIN_S)
            return


def serve(app, settings) -> int:
    """Run the app until it is told to stop; the process's exit status."""
    lifecycle: Lifecycle = app.state.lifecycle
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=settings.timeout_keep_alive,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    server = GatemixServer(config, lifecycle)
    lifecycle.server = server
    server.run()
    if not server.started and lifecycle.exit_code == 0:
        return STARTUP_FAILURE  # its error is logged
    return lifecycle.exit_code
