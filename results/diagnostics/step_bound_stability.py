"""Issue 12, item 2: does the DGD step stay bounded for trained-like weights at eta = eta_max?

A tiny self-modifying HOPE (deep memories) with every memory's initial state scaled to trained-like
norms (W1 ~ N(0, s1^2), W2 ~ N(0, s2^2)), the learning-rate bias at +8 (eta ~ eta_max) and alpha ~ 1,
run over 4096 random tokens, with `primitives.step_bound` on and off (factor forced to 1; `primitives.dgd_terms` calls it on
both the chunked and the reference paths).
Prints the largest |state| and |logit| and whether they are finite.

    OMP_NUM_THREADS=1 PYTHONPATH=. python results/diagnostics/step_bound_stability.py
"""

import torch

import hope_hf.models.hope.primitives as primitives
from hope_hf import HopeConfig, HopeForCausalLM

torch.set_num_threads(1)


def trained_like(eta_max, s1, s2, memory_read="token", seed=0, length=4096, memory_type="deep", mixer="self_modifying"):
    torch.manual_seed(seed)
    config = HopeConfig(vocab_size=61, hidden_size=32, num_heads=2, num_hidden_layers=1, chunk_size=16,
                        memory_chunk_size=64, cms_chunk_sizes=[None], eta_max=eta_max, memory_read=memory_read,
                        memory_type=memory_type, mixer=mixer)
    model = HopeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".W1"):
                p.normal_(0, s1)
            elif name.endswith(".W2"):
                p.normal_(0, s2)
            elif name.endswith(".W"):
                p.add_(torch.randn_like(p) * s1)
            elif name.endswith("eta_bias") or name.endswith("eta_proj.bias"):
                p.fill_(8.0)
            elif name.endswith("alpha_bias") or name.endswith("alpha_proj.bias"):
                p.fill_(8.0)
    ids = torch.randint(3, 61, (1, length), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    states = [t for layer in out.past_key_values.layers for n, t in layer.state.flatten().items()
              if n.startswith("mem.") and t.is_floating_point()]
    top = max(float(t.abs().max()) for t in states)
    return top, float(out.logits.abs().max())


if __name__ == "__main__":
    original = primitives.step_bound
    for bounded in (True, False):
        if not bounded:
            unbounded = lambda state, key, target_key, eta, act: {n: torch.ones_like(eta) for n in state}  # noqa: E731
            primitives.step_bound = unbounded
        else:
            primitives.step_bound = original
        for eta_max in (1.0, 1.9):
            for s1, s2 in ((0.5, 2.0), (1.0, 3.0)):
                top, logit = trained_like(eta_max, s1, s2)
                print(f"bound={bounded} eta_max={eta_max} W1 std={s1} W2 std={s2}: max|state|={top:.3g} "
                      f"max|logit|={logit:.3g}", flush=True)
