"""The arrows between rooms point down the pipeline, and the serve-time gate never reads the fit.

The graph itself prints with ``python tests/house/import_graph.py``.
"""

from __future__ import annotations

import subprocess
import sys

from import_graph import ROOMS, module_edges, product_modules, room_of, upward_imports


def test_no_room_imports_one_above_it_in_the_pipeline():
    assert upward_imports(module_edges()) == []


def test_the_serve_time_gate_never_imports_the_offline_fit():
    edges = module_edges()
    serve_time = [module for module in edges if room_of(module) == "gate"]
    assert serve_time, "no serve-time gate modules found"
    reads_fit = {m: sorted(t for t in edges[m] if room_of(t) == "gate.fit") for m in serve_time}
    assert {m: t for m, t in reads_fit.items() if t} == {}


def test_the_engine_model_imports_neither_the_fit_nor_packing_nor_the_project_readers():
    """What vLLM loads in every worker (the composite model) pulls in neither the fit nor the
    project file and data readers: checked on the real import, not the source."""
    probe = (
        "import sys, gatemix.engine.composite_model, gatemix.engine.request_gates; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('gatemix'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    forbidden = [m for m in loaded if room_of(m) in {"gate.fit", "server", "distill", "demo", "bench"}]
    # Packing and the project's orchestration are the jobs' (engine/pack.py), not the model's.
    jobs_only = {"gatemix.project", "gatemix.data_sources", "gatemix.data_tables", "gatemix.engine.pack"}
    forbidden += [m for m in loaded if m in jobs_only]
    assert "gatemix.engine.composite_model" in loaded and forbidden == []


def test_the_graph_reader_sees_every_room_and_an_upward_import_when_there_is_one():
    modules = product_modules()
    assert {room_of(m) for m in modules} == set(ROOMS)
    edges = {"gatemix.gate.mixing": {"gatemix.gate.fit.family"}, "gatemix.gate.fit.family": set()}
    assert upward_imports(edges) == [
        "gatemix.gate.mixing -> gatemix.gate.fit.family (gate imports gate.fit, above it)"
    ]
