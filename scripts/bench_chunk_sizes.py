"""Training speed of HOPE by the projection memories' `chunk_size`, against a same-size Llama in the same run.

    OMP_NUM_THREADS=1 python scripts/bench_chunk_sizes.py --chunk-sizes 16 32 64 --out runs/bench_chunk_sizes

The bench rows of `bench_speed.py` (d=256, 4 layers, vocab 8192, one sequence of T tokens, AdamW step), with only
`chunk_size` changed; the models are timed in interleaved rounds so that a change in the machine's load hits every
row alike. Prints tokens/s (median over rounds) and the ratio to the Llama; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import _cpu_name, build_model, parse_size, train_step_seconds  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--size", default="", help="e.g. d=256,layers=4,heads=4,vocab=8192 (the default)")
    parser.add_argument("--length", type=int, default=2048, help="tokens per training sequence")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--out", default="runs/bench_chunk_sizes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = parse_size(args.size)
    rows = {"llama": build_model("llama", size)}
    for chunk_size in args.chunk_sizes:
        rows[f"hope chunk_size {chunk_size}"] = build_model("hope", size, chunk_size=chunk_size)
    ids = torch.randint(0, size["vocab"], (1, args.length), generator=torch.Generator().manual_seed(1))
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in rows.items()}
    seconds = {name: [] for name in rows}
    for round_index in tqdm(range(args.rounds + 1), desc="rounds"):
        for name, model in rows.items():
            t = train_step_seconds(model.train(), ids, optimizers[name])
            if round_index:
                seconds[name].append(t)
    llama = args.length / statistics.median(seconds["llama"])
    table = {name: {"tokens_per_s": args.length / statistics.median(s), "seconds": s} for name, s in seconds.items()}
    print(f"| model (T={args.length}, 1 thread) | train tok/s | vs Llama |\n|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['tokens_per_s']:,.0f} | {row['tokens_per_s'] / llama:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(sys.argv), "size": size, "length": args.length, "cpu": _cpu_name(), "rows": table}
    (out / "bench_chunk_sizes.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
