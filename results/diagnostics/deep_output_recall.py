"""Issue 12 / docs/design.md §8.22: how well one chunk of DGD writes stores N key-value pairs in a deep memory
`M(z) = z + W1 act(W2 z)` under each rule for W1's inner gradient: at the chunk-start state (`deep_output_gradient=
"chunk"`, the writes of a chunk cannot correct each other) or at the current W1 on the chunk-start hidden features
(`"token"`, a delta rule). The memory starts at the main memory's initial state of the MQAR suite's default HOPE
(d=64, 4 heads, head_dim 16, memory hidden 16, `_init_weights`); N random unit keys and unit values are written with
self-generated targets `M_S(v^)` at eta 1 and alpha 0.999 (the default's rates at init), all in one chunk, as
`dgd_naive` does. Printed: the fraction of the initial inner error left at the written pairs after the chunk,
`|M_end(k_i) - M_S(v^_i)| / |M_S(k_i) - M_S(v^_i)|`, mean over pairs, heads and 64 draws (1 = nothing stored);
the same with the hidden layer read at the chunk-start W2 (`q + W1_end act(W2_S q)`); and how much of the hidden
layer's pre-activation at a written key is left, `|W2_end k_i| / |W2_S k_i|` (W2's DGD erase at eta 1 removes it).

    python results/diagnostics/deep_output_recall.py > results/diagnostics/deep_output_recall.txt
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from hope_hf import HopeConfig, HopeForCausalLM  # noqa: E402
from hope_hf.models.hope.cache_hope import MemoryState  # noqa: E402
from hope_hf.models.hope.dgd_naive import _learn, _read  # noqa: E402
from hope_hf.models.hope.primitives import MemoryRule, l2norm  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
config = HopeConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_heads=4, cms_chunk_sizes=[8, None])
initial = HopeForCausalLM(config).model.layers[0].mixer.memories["mem"]
draws, heads, dim = 64, config.num_heads, config.head_dim
print(f"main memory at init: |W1| {float(initial.W1.detach().norm()):.3f}, |W2| {float(initial.W2.detach().norm()):.3f} "
      "(all heads); per rule and pairs written: error left (read at the end state) / (hidden layer at the chunk start) "
      "/ hidden pre-activation left")
for rule_name in ("chunk", "token"):
    rule = MemoryRule(activation="silu", eps=config.norm_eps, updates=True, memory_read="token", step_bound=True,
                      deep_output_gradient=rule_name)
    line = []
    for pairs in (1, 2, 4, 8, 16, 32):
        gen = torch.Generator().manual_seed(pairs)
        keys = l2norm(torch.randn(draws, pairs, heads, dim, generator=gen, dtype=torch.float64), 1e-6)
        values = l2norm(torch.randn(draws, pairs, heads, dim, generator=gen, dtype=torch.float64), 1e-6)
        start = {name: w.detach().double().expand(draws, *w.shape) for name, w in initial.named_parameters()}
        state = MemoryState(start, start)
        eta, alpha = torch.ones(draws, heads, dtype=torch.float64), torch.full((draws, heads), 0.999, dtype=torch.float64)
        active, no_end = torch.ones(draws, dtype=torch.bool), torch.zeros(draws, dtype=torch.bool)
        for t in range(pairs):
            target = _read(start, values[:, t], rule.activation)
            state = _learn(state, keys[:, t], target, values[:, t], eta, alpha, active, no_end, rule)
        left, left_start_features, feature_kept = [], [], []
        for t in range(pairs):
            target = _read(start, values[:, t], rule.activation)
            before = (_read(start, keys[:, t], rule.activation) - target).norm(dim=-1)
            after = (_read(state.current, keys[:, t], rule.activation) - target).norm(dim=-1)
            mixed = {"W1": state.current["W1"], "W2": start["W2"]}  # hidden layer read at the chunk start
            left.append(after / before)
            left_start_features.append((_read(mixed, keys[:, t], rule.activation) - target).norm(dim=-1) / before)
            pre = lambda w: (w["W2"] @ keys[:, t].unsqueeze(-1)).squeeze(-1).norm(dim=-1)  # noqa: E731
            feature_kept.append(pre(state.current) / pre(start))
        mean = lambda xs: float(torch.stack(xs).mean())  # noqa: E731
        line.append(f"{pairs:2d} pairs {mean(left):.3f} / {mean(left_start_features):.3f} / {mean(feature_kept):.3f}")
    print(f"deep_output_gradient={rule_name}: " + ", ".join(line), flush=True)
