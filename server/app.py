"""``create_app(settings)``: the FastAPI app; its lifespan builds the engine.

Nothing happens at import or in ``create_app``: the model folder is resolved
(the demo built if needed), the tokenizer loaded and vLLM's ``AsyncLLM``
started when the server starts, and shut down when it stops. While it runs, a
watchdog ends the process if the engine dies (``lifecycle.py``); the limits
middleware (``limits.py``) sits outside everything else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI

from gatemix import __version__
from gatemix.engine.composite_folder import GATE_SUBDIR
from gatemix.engine.engine_config import EngineSettings, build_async_engine
from gatemix.engine.gate_trace import GateTraceReceiver
from gatemix.engine.project_composite import ensure_composite
from gatemix.errors import UserError
from gatemix.gate.artifact import METADATA_FILE
from gatemix.project import Project, load_project
from gatemix.project_file import PROJECT_FILE_NAMES
from gatemix.server.chat_template import ChatRenderer
from gatemix.server.errors import install_error_handlers
from gatemix.server.gate_admin import GateAdmin, gate_report
from gatemix.server.lifecycle import Lifecycle, watch_engine
from gatemix.server.limits import Admission, LimitsMiddleware
from gatemix.server.metrics import GateMetrics
from gatemix.server.openapi import openapi_document
from gatemix.server.routes import router
from gatemix.server.served_models import ServedModels
from gatemix.server.serving import ServingEngine
from gatemix.server.serving_chat import OpenAIServingChat
from gatemix.server.serving_completion import OpenAIServingCompletion
from gatemix.server.serving_responses import OpenAIServingResponses, ResponseStore
from gatemix.server.serving_tokenize import OpenAIServingTokenization
from gatemix.server.settings import Settings
from gatemix.server.tools import ToolCalling

logger = logging.getLogger(__name__)

def resolve_settings(settings: Settings) -> Settings:
    """Settings with the folder to serve. Idempotent: the result names ``model_dir`` alone.

    ``model_dir`` is served as it is. Else the project's composite (packed from
    its experts and fitted gate when missing or stale) under the project's name;
    with no project either, the project in ``demo_dir``. The server does not build
    the demo (the serving room does not reach up into the demo's): ``make serve``
    runs ``gatemix build-demo`` first.
    """
    if settings.model_dir is not None:
        if settings.project is not None:
            raise UserError("give --model-dir or --project, not both")
        if not (settings.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{settings.model_dir} is not a model folder (no config.json)")
        return settings
    project_file = settings.project
    if project_file is None:
        project_file = settings.demo_dir
        if not any((Path(project_file) / name).is_file() for name in PROJECT_FILE_NAMES):
            raise UserError(
                f"no --model-dir or --project, and no demo project in {project_file}: build it "
                f"with `gatemix build-demo --out {project_file}` (what `make serve` does) or name one"
            )
        logger.info("no --model-dir or --project: serving the demo's project in %s", project_file)
    project = load_project(project_file, check_data=False)
    info = ensure_composite(project)
    logger.info("project %s: serving %s with gate %s (%s)", project.path, info.path, info.gate_version, info.gate_method)
    name = settings.served_model_name or project.name
    update = {"model_dir": info.path, "project": None, "served_model_name": name}
    if settings.gate_artifact is None:  # SIGHUP re-reads what fit-gate rewrites
        update["gate_artifact"] = project.gate_dir
    if project.draft is not None and settings.engine.draft is None:
        update["engine"] = _with_project_draft(settings.engine, project)
    return settings.model_copy(update=update)


def _with_project_draft(engine: EngineSettings, project: Project) -> EngineSettings:
    """The project's ``[serve]`` draft; a ``--num-draft-tokens`` flag or variable wins over its N."""
    update = {"draft": str(project.draft)}
    if project.num_draft_tokens is not None and "num_draft_tokens" not in engine.model_fields_set:
        update["num_draft_tokens"] = project.num_draft_tokens
    logger.info("project %s: decoding behind its [serve] draft %s", project.path, project.draft)
    return engine.model_copy(update=update)


def _with_gate_report(models: ServedModels, artifact_dir: Path) -> ServedModels:
    """The fit's report, when the configured artifact is the gate the composite holds."""
    try:
        version = json.loads((Path(artifact_dir) / METADATA_FILE).read_text())["version"]
    except (OSError, ValueError, KeyError):
        return models
    if version != models.gate_version:
        return models
    return dataclasses.replace(models, gate_report=gate_report(artifact_dir))


def _install_serving(app: FastAPI, settings: Settings, *, engine, tokenizer, models, receiver):
    """The handlers the routes find on ``app.state``, around one engine and one tokenizer."""
    renderer = ChatRenderer(
        tokenizer, settings.chat_template.read_text() if settings.chat_template else None
    )
    tools = ToolCalling(tokenizer=tokenizer, renderer=renderer, parser_name=settings.tool_call_parser)
    metrics = GateMetrics(models.expert_names, models.gate_version or "none", models.gate_loaded_at)
    core = ServingEngine(
        engine=engine,
        tokenizer=tokenizer,
        models=models,
        receiver=receiver,
        metrics=metrics,
        settings=settings,
        vocab_size=engine.model_config.get_vocab_size(),
        max_model_len=engine.model_config.max_model_len,
    )
    chat = OpenAIServingChat(core=core, renderer=renderer, tools=tools)
    app.state.engine = engine
    app.state.models = models
    app.state.metrics = metrics
    app.state.serving_core = core
    # The engine runs max_num_seqs requests at once in each replica; max_queued_requests more may wait.
    app.state.admission = Admission(
        capacity=settings.engine.running_capacity() + settings.max_queued_requests,
        retry_after_s=settings.retry_after_s,
    )
    app.state.serving_completion = OpenAIServingCompletion(core=core)
    app.state.serving_chat = chat
    app.state.serving_responses = OpenAIServingResponses(chat=chat, store=ResponseStore())
    app.state.serving_tokenization = OpenAIServingTokenization(core=core, chat=chat)
    app.state.gate_admin = GateAdmin(
        app.state, engine=engine, composite_dir=settings.model_dir,
        configured=settings.gate_artifact or settings.model_dir / GATE_SUBDIR,
    ) if models.is_composite else None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # transformers and vLLM take seconds to import: only a starting server pays for them.
    from transformers import AutoTokenizer
    from vllm.utils.gc_utils import freeze_gc_heap

    settings = await asyncio.to_thread(resolve_settings, app.state.settings)
    model_dir = settings.model_dir
    models = ServedModels.from_folder(model_dir, settings.served_model_name).with_draft(
        settings.engine.draft, settings.engine.num_draft_tokens
    )
    if settings.engine.draft is not None:
        logger.info("speculative decoding: draft %s proposes %d tokens per step (vLLM's draft_model)",
                    settings.engine.draft, settings.engine.num_draft_tokens)
    if models.is_composite:
        models = _with_gate_report(models, settings.gate_artifact or model_dir / GATE_SUBDIR)
        logger.info("gate %s (%s) serves %s; report: %s", models.gate_version, models.gate_method,
                    models.ensemble_name, models.gate_report or "none found")
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model_dir))
    logger.info(
        "serving %s from %s: experts %s", models.ensemble_name, model_dir, models.expert_names
    )
    # AsyncLLM starts its output handler on the running loop, so it is built here, not in a thread.
    # vLLM's own metrics are labelled with the ensemble's name, as gatemix's are.
    engine = build_async_engine(model_dir, settings.engine, served_model_name=models.ensemble_name)
    receiver = GateTraceReceiver() if models.is_composite else None
    watchdog = None
    try:
        if receiver is not None:
            await receiver.start()
        _install_serving(
            app, settings, engine=engine, tokenizer=tokenizer, models=models, receiver=receiver
        )
        # A dead engine ends the process (lifecycle.py), as vLLM's own server does.
        watchdog = asyncio.create_task(
            watch_engine(engine, app.state.lifecycle, settings.engine_check_interval_s),
            name="gatemix-engine-watchdog",
        )
        # As vLLM's own server does: the startup heap (torch, transformers, vLLM) is static,
        # and every full collection would walk it again (passes of 50-450 ms at start-up).
        freeze_gc_heap()
        if app.state.gate_admin is not None:
            app.state.gate_admin.install_sighup()
        yield
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if getattr(app.state, "gate_admin", None) is not None:
            app.state.gate_admin.remove_sighup()
        engine.shutdown()
        if receiver is not None:
            await receiver.close()


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="gatemix",
        version=__version__,
        description="OpenAI-compatible server for a gated mixture of expert language models.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.lifecycle = Lifecycle()
    install_error_handlers(app)
    app.include_router(router)
    # Outermost: the body limit applies before FastAPI reads or parses anything.
    app.add_middleware(LimitsMiddleware, max_body_bytes=settings.max_body_bytes)
    app.openapi = partial(openapi_document, app)
    return app
