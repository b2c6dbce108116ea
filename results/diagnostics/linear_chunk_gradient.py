"""Issue 12 / docs/design.md §8.20: the self-modifying mixer with linear memories and trained-like weights
(tests/test_in_context.py::trained_like) at eta_max 1 grows its main memory when the inner gradient is taken at
the chunk-start state (the rule today), and stays bounded when the gradient and the self-generated target are
taken at the current state (a patched per-token reference loop; the fix that design.md §8.20 proposes).
Prints max |W| of the main memory after every 512 tokens.

    python results/diagnostics/linear_chunk_gradient.py > results/diagnostics/linear_chunk_gradient.txt
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import torch
from test_in_context import trained_like
import hope_hf.models.hope.dgd_naive as naive
from hope_hf.models.hope.cache_hope import MemoryState
from hope_hf.models.hope.hf_compat import CACHE_NAME, output_cache
from hope_hf.models.hope.modeling_hope import scan_implementation
from hope_hf.models.hope.primitives import dgd_terms
from hope_hf.models.hope.chunk_grid import select_where
torch.set_num_threads(1)
def learn_current(state, key, target, target_key, eta, alpha, active, chunk_end, rule):
    # gradient at the current state (the self-generated target too), for linear memories
    cur = state.current
    if target_key is not None:
        target = naive._read(cur, target_key, rule.activation)
    terms = dgd_terms(cur, key.unsqueeze(-2), target.unsqueeze(-2), rule.activation, rule.eps,
                      None if target_key is None else target_key.unsqueeze(-2),
                      eta.unsqueeze(-1) if rule.step_bound else None)
    terms = {n: (u.squeeze(-2), w.squeeze(-2)) for n, (u, w) in terms.items()}
    current = select_where(active, naive.dgd_step(cur, terms, eta, alpha), cur)
    return MemoryState(select_where(active & chunk_end, current, state.start), current)


ids = torch.randint(3, 61, (1, 2048), generator=torch.Generator().manual_seed(2))
for mode in ("chunk-start (today)", "current"):
    if mode == "current":
        naive._learn = learn_current
    for eta_max in (1.0, 1.9):
        model = trained_like(0, eta_max, mixer="self_modifying", memory_type="linear")
        cache, line = None, []
        with torch.no_grad(), scan_implementation(model, "reference"):
            for first in range(0, 2048, 512):
                out = model(ids[:, first:first + 512], **{CACHE_NAME: cache}, use_cache=True)
                cache = output_cache(out)
                line.append(round(float(cache.layers[0].state.flatten()["mem.mem.W"].abs().max()), 2))
        print(mode, eta_max, line, flush=True)
