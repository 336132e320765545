#!/usr/bin/env bash
# The GPU check (python -m gatemix.bench.gpu_check) from a plain copy of the repository.
#
# The GPU machines lent to development have torch and transformers but no vLLM
# and no package registry, so nothing is pip-installed: a temporary folder on
# PYTHONPATH holds `gatemix` laid out as an install would lay it out
# (pyproject's package-dir): the repo's gatemix/ files, with engine/, gate/,
# demo/, server/, distill/ and bench/ linked in as its subpackages.
#
#   bash bench/gpu_check.sh [--tiny] [--sections ...] [--repeats N] ...
#
# With $OUT set (the device runner's output folder) the figures are also
# written to $OUT/gpu_check.json. Set PYTHON to use another interpreter.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
stage="$(mktemp -d "${TMPDIR:-/tmp}/gatemix-stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

mkdir "$stage/gatemix"
for entry in "$repo"/gatemix/*; do
    [[ "$(basename "$entry")" == __pycache__ ]] || ln -s "$entry" "$stage/gatemix/"
done
for package in engine gate demo server distill bench; do
    ln -s "$repo/$package" "$stage/gatemix/$package"
done
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

out_flags=()
if [[ -n "${OUT:-}" ]]; then
    out_dir="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
    out_flags=(--out "$out_dir/gpu_check.json")
fi

# `python -m` puts the working directory first on sys.path, and from the repo
# root its gatemix/ (no subpackages) would shadow the staged one. Python 3.11+
# leaves it off with PYTHONSAFEPATH; older ones run from the staged folder.
export PYTHONSAFEPATH=1
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "gpu_check.sh: Python < 3.11, running from $stage: give --out as an absolute path" >&2
    cd "$stage"
fi

# Flags given on the command line come last, so they win over $OUT.
"$python" -m gatemix.bench.gpu_check ${out_flags[@]+"${out_flags[@]}"} "$@"
