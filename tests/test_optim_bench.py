"""Smoke test of scripts/bench_optimizers.py (2 steps, a tiny model, a text file)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_optimizers.py"


def test_bench_optimizers_writes_results(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_optimizers", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    out = tmp_path / "out"
    results = bench.main([
        "--model", "llama", "--steps", "2", "--eval-every", "1", "--val-batches", "1", "--optimizers", "adamw,m3",
        "--batch-size", "2", "--seq-len", "16", "--hidden-size", "32", "--layers", "1", "--heads", "2",
        "--warmup", "1", "--text-file", str(text), "--out", str(out),
    ])
    assert [r["optimizer"] for r in results] == ["adamw", "m3"]
    assert (out / "loss_curves.png").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [row["optimizer"] for row in rows] == ["adamw", "m3"]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert all(len(r["train_curve"]) == 2 and len(r["val_curve"]) == 2 for r in runs)
