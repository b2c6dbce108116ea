"""How strongly does the last position depend on earlier tokens, per mixer, at initialisation?

    OMP_NUM_THREADS=1 python results/diagnostics/gradient_reach.py

For the synthetic-suite model (d=64, 2 layers, 4 heads, chunk 8, CMS [8, None]; vocab 14), the norm of
d (last position's logits . probe) / d (input embedding at position t), averaged over 8 random sequences
of 40 tokens and 3 seeds, for t in distance buckets from the last position. Attention reaches every
earlier token directly; a memory mixer only through the fast weights written at chunk ends, and the
tokens of the last open chunk beyond the conv window (4) not at all (SPEC section 3: reads use the
chunk-start state).
"""
import torch

from hope_hf import HopeConfig, HopeForCausalLM

BUCKETS = [(1, 1), (2, 4), (5, 8), (9, 16), (17, 24), (25, 39)]  # distance back from the last position
VARIANTS = [("attention", "deep", {}), ("self_modifying", "deep", {}), ("self_modifying", "linear", {}),
            ("titans", "linear", {}), ("self_modifying", "deep", {"eta_init": 0.9, "eta_max": 1.0}),
            ("self_modifying", "deep", {"chunk_size": 1, "memory_chunk_size": 1})]

print("| mixer | memory | overrides | " + " | ".join(f"t-{a}..t-{b}" if a != b else f"t-{a}" for a, b in BUCKETS)
      + " | last (t) |")
print("|" + "---|" * (len(BUCKETS) + 4))
for mixer, memory_type, overrides in VARIANTS:
    reach = torch.zeros(40)
    for seed in range(3):
        torch.manual_seed(seed)
        config = HopeConfig(vocab_size=14, pad_token_id=0, hidden_size=64, num_hidden_layers=2, num_heads=4,
                            **{"chunk_size": 8, "memory_chunk_size": 8, **overrides}, cms_chunk_sizes=[8, None],
                            mixer=mixer, memory_type=memory_type)
        model = HopeForCausalLM(config)
        embeds = model.model.embed_tokens(torch.randint(3, 14, (8, 40))).detach().requires_grad_()
        probe = torch.randn(8, 14)
        (model(inputs_embeds=embeds).logits[:, -1] * probe).sum().backward()
        reach += embeds.grad.norm(dim=-1).mean(0) / 3
    back = reach.flip(0)  # back[k]: k tokens before the last
    cells = [back[a:b + 1].mean().item() for a, b in BUCKETS]
    print(f"| {mixer} | {memory_type} | {overrides or ''} | " + " | ".join(f"{c:.1e}" for c in cells)
          + f" | {back[0].item():.1e} |")
