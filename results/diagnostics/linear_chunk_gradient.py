"""Issue 12 / docs/design.md §8.20: the self-modifying mixer with linear memories and trained-like weights
(tests/test_in_context.py::trained_like) grows its main memory at eta_max 1 when the inner gradient is taken at
the chunk-start state (`linear_gradient="chunk"`, the rule before the fix), and stays bounded when the gradient
and the self-generated target are taken at the current state (`"token"`, the default since). Prints max |W| of
the main memory after every 512 tokens, for the per-token reference and the chunked path.

    python results/diagnostics/linear_chunk_gradient.py > results/diagnostics/linear_chunk_gradient.txt
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import torch  # noqa: E402
from test_in_context import trained_like  # noqa: E402

from hope_hf.models.hope.hf_compat import CACHE_NAME, output_cache  # noqa: E402
from hope_hf.models.hope.modeling_hope import scan_implementation  # noqa: E402

torch.set_num_threads(1)
ids = torch.randint(3, 61, (1, 2048), generator=torch.Generator().manual_seed(2))
for rule in ("chunk", "token"):
    for implementation in ("reference", "chunked"):
        for eta_max in (1.0, 1.9):
            model = trained_like(0, eta_max, mixer="self_modifying", memory_type="linear", linear_gradient=rule)
            cache, line = None, []
            with torch.no_grad(), scan_implementation(model, implementation):
                for first in range(0, 2048, 512):
                    out = model(ids[:, first:first + 512], **{CACHE_NAME: cache}, use_cache=True)
                    cache = output_cache(out)
                    line.append(round(float(cache.layers[0].state.flatten()["mem.mem.W"].abs().max()), 2))
            print(f"linear_gradient={rule} {implementation} eta_max {eta_max}: max |W_mem| {line}", flush=True)
