"""Is bf16 faster than float32 on this CPU? Matrix products at the shapes HOPE and SmolLM2 use, one thread.

    OMP_NUM_THREADS=1 python results/diagnostics/bf16_gemm_speed.py [--out bf16_gemm_speed.json]

Prints the CPU, whether `hope_hf.training.bf16_is_fast` finds a native bf16 unit (AMX / AVX-512 BF16 flags),
and for each shape the median time of `F.linear(x, w)` (an `nn.Linear` weight `[n, k]`) in float32, in bf16, and
under CPU autocast with float32 inputs (what `--bf16` does), with the ratio bf16 / float32 (above 1: bf16 is slower).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hope_hf.training import NATIVE_BF16_CPU_FLAGS, _cpu_flags, bf16_is_fast  # noqa: E402

# (rows, inner, cols): HOPE d=256 projections at T=2048; a 64-token chunk's 64x64 products; a per-head
# memory update [B*H*chunk, d_h] x [d_h, d_h]; SmolLM2-135M's MLP on 512 tokens
SHAPES = [(2048, 256, 1024), (64, 64, 64), (1024, 64, 64), (512, 576, 1536)]


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown")
    flags = sorted(_cpu_flags() & {"avx2", "avx512f", *NATIVE_BF16_CPU_FLAGS})
    print(f"cpu: {cpu}; flags: {flags}; torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}; bf16_is_fast: {bf16_is_fast('cpu')}")
    rows = []
    for m, k, n in SHAPES:
        # x [m, k] and an nn.Linear weight [n, k] (contiguous, as a model holds it): y = x w^T
        x, w = torch.randn(m, k), torch.randn(n, k)
        x16, w16 = x.bfloat16(), w.bfloat16()
        fp32 = median_seconds(lambda: torch.nn.functional.linear(x, w), args.repeats)
        bf16 = median_seconds(lambda: torch.nn.functional.linear(x16, w16), args.repeats)

        def autocast_linear():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.nn.functional.linear(x, w)

        auto = median_seconds(autocast_linear, args.repeats)
        row = {"shape": [m, k, n], "fp32_ms": round(fp32 * 1e3, 4), "bf16_ms": round(bf16 * 1e3, 4),
               "autocast_ms": round(auto * 1e3, 4), "bf16_over_fp32": round(bf16 / fp32, 2),
               "autocast_over_fp32": round(auto / fp32, 2)}
        rows.append(row)
        print(row, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu, "flags": flags, "bf16_is_fast": bf16_is_fast("cpu"),
                                              "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
