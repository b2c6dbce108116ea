"""The chunk-parallel fast path (`dgd_chunk.py`, `cms_chunk.py`) equals the per-token reference: outputs, end
states and gradients, on random configs, seeds, split points and padding (float64, 1e-10)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import tiny_config, tiny_model
from hope_hf import HopeForCausalLM, scan_implementation
from hope_hf.models.hope.cache_hope import CMSState
from hope_hf.models.hope.chunk_grid import ChunkGrid
from hope_hf.models.hope.cms_chunk import cms_chunk
from hope_hf.models.hope.cms_naive import cms_naive
from hope_hf.models.hope.dgd_chunk import dgd_chunk, self_modifying_titans_chunk, titans_chunk
from hope_hf.models.hope.dgd_naive import dgd_step, self_modifying_titans_naive, titans_naive
from hope_hf.models.hope.modeling_hope import SCANS
from hope_hf.models.hope.primitives import SwiGLUPass, dgd_terms, gradient_factors, l2norm

from test_streaming import flat_state, run_split
from hope_hf.models.hope.hf_compat import output_cache


def random_config(draw_seed: int, **overrides):
    gen = torch.Generator().manual_seed(draw_seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    kwargs = dict(
        mixer=pick(["self_modifying", "titans"]),
        memory_type=pick(["deep", "linear"]),
        memory_activation=pick(["silu", "gelu", "tanh"]),
        chunk_size=pick([1, 2, 3, 4]),
        memory_chunk_size=pick([1, 3, 5, 8]),
        cms_chunk_sizes=pick([[2, 7, None], [3], [1, None], [4, 5]]),
        cms_variant=pick(["sequential", "independent"]),
        memory_hidden_size=pick([None, 5]),
        memory_read=pick(["token", "chunk", "token_output"]),
        linear_gradient=pick(["token", "chunk"]),
        deep_output_gradient=pick(["token", "chunk"]),
    )
    kwargs.update(overrides)
    return kwargs


def padded_batch(seed: int, length: int, pads):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 61, (len(pads), length), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids, mask


def compare(model, ids, mask, cuts, tol):
    with torch.no_grad():
        fast, fast_cache = run_split(model, ids, cuts, mask=mask)
        with scan_implementation(model, "reference"):
            ref, ref_cache = run_split(model, ids, [], mask=mask)
    real = mask.bool()
    torch.testing.assert_close(fast[real], ref[real], atol=tol, rtol=0)
    a, b = flat_state(ref_cache), flat_state(fast_cache)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name].to(a[name].dtype), a[name], atol=tol, rtol=0, msg=name)


@settings(max_examples=25, deadline=None)
@given(
    config_seed=st.integers(0, 10_000),
    seed=st.integers(0, 10_000),
    cuts=st.lists(st.integers(1, 22), max_size=4, unique=True).map(sorted),
    pads=st.lists(st.integers(0, 9), min_size=1, max_size=3),
)
def test_fast_equals_reference_float64(config_seed, seed, cuts, pads):
    """Any config, any split of the stream into calls, any left padding: the chunked path in
    pieces equals the reference in one call, at real tokens and in every state tensor."""
    model = tiny_model(seed=seed, dtype=torch.float64, **random_config(config_seed))
    ids, mask = padded_batch(seed + 1, 23, pads)
    compare(model, ids, mask, cuts, 1e-10)


@pytest.mark.parametrize("mixer", ["self_modifying", "titans"])
@pytest.mark.parametrize("memory_type", ["deep", "linear"])
def test_fast_equals_reference_float32(mixer, memory_type):
    model = tiny_model(seed=7, mixer=mixer, memory_type=memory_type)
    ids, mask = padded_batch(8, 40, [0, 5, 13])
    compare(model, ids, mask, [9, 10, 27], 1e-4)


@pytest.mark.parametrize("mixer", ["self_modifying", "titans"])
@pytest.mark.parametrize("memory_type", ["deep", "linear"])
@pytest.mark.parametrize("memory_read", ["token", "chunk", "token_output"])
def test_fast_equals_reference_both_reads(mixer, memory_type, memory_read):
    """Per-token reads of the main memory (`o_t = M_{t-1}(q_t)`, intra-chunk reads as masked matmuls
    through both layers of a deep memory, or through its output layer with "token_output") and chunk-start
    reads, with long chunks, left padding that
    spans a chunk boundary and single-token decoding: chunked == reference (float64, 1e-10)."""
    model = tiny_model(seed=17, dtype=torch.float64, mixer=mixer, memory_type=memory_type, memory_read=memory_read,
                       chunk_size=4, memory_chunk_size=8, memory_hidden_size=6)
    ids, mask = padded_batch(18, 30, [0, 3, 11])
    compare(model, ids, mask, [5, 13, 14, 22, 23], 1e-10)


@pytest.mark.parametrize("mixer", ["self_modifying", "titans"])
@pytest.mark.parametrize("memory_hidden_size", [None, 6])  # None: W1 and W2 in one solve
def test_deep_output_gradient_at_current_state(mixer, memory_hidden_size):
    """`deep_output_gradient="token"`: W1's inner gradient at the current W1 on the chunk-start hidden
    features (a delta rule solved per chunk with its own erase term), W2's at the chunk start. Chunked ==
    reference (float64, 1e-10) in outputs, states and outer gradients, with long chunks, padding across a
    chunk boundary and single-token decoding; and it computes something else than the chunk-start rule."""
    kwargs = dict(dtype=torch.float64, mixer=mixer, memory_type="deep", chunk_size=4, memory_chunk_size=8,
                  memory_hidden_size=memory_hidden_size)
    model = tiny_model(seed=21, deep_output_gradient="token", **kwargs)
    ids, mask = padded_batch(22, 30, [0, 3, 11])
    compare(model, ids, mask, [5, 13, 14, 22, 23], 1e-10)
    with torch.no_grad():
        other = tiny_model(seed=21, deep_output_gradient="chunk", **kwargs)(ids, attention_mask=mask).logits
        assert float((model(ids, attention_mask=mask).logits - other).abs().max()) > 1e-4
    grads = {}
    for name in ("chunked", "reference"):
        model.zero_grad()
        with scan_implementation(model, name):
            model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads["chunked"]) > 20 and grads["chunked"].keys() == grads["reference"].keys()
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads["chunked"][name], g, atol=1e-10, rtol=1e-8, msg=name)


def test_token_reads_see_the_last_write():
    """With memory_read="token" a write is visible to the next token inside a chunk: changing the first
    token moves the main memory's read at token 2 (chunk of 64), which chunk-start reads cannot do."""
    reach = {}
    for memory_read in ("token", "chunk"):
        model = tiny_model(seed=3, dtype=torch.float64, memory_read=memory_read, memory_chunk_size=64,
                           conv_window=1, num_hidden_layers=1, cms_chunk_sizes=[None])
        ids = torch.randint(3, 61, (1, 6), generator=torch.Generator().manual_seed(4))
        other = ids.clone()
        other[0, 0] = 3 if int(ids[0, 0]) != 3 else 4
        with torch.no_grad():
            reach[memory_read] = float((model(ids).logits[0, 2] - model(other).logits[0, 2]).abs().max())
    assert reach["chunk"] < 1e-12 < 1e-6 < reach["token"]


@pytest.mark.parametrize("memory_read", ["token", "chunk"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_gradients_equal_reference(seed, memory_read):
    """The outer gradient through every in-context update: same for both paths (float64)."""
    overrides = random_config(100 + seed, memory_read=memory_read)
    if memory_read == "token":  # and a linear memory's gradient at the current state, self-generated targets
        overrides.update(mixer="self_modifying", memory_type="linear", linear_gradient="token")
    grads = {}
    for name in ("chunked", "reference"):
        model = tiny_model(seed=seed, dtype=torch.float64, **overrides).train()
        ids, mask = padded_batch(seed + 3, 21, [0, 4])
        with scan_implementation(model, name):
            loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["chunked"].keys() == grads["reference"].keys()
    assert len(grads["chunked"]) > 20
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads["chunked"][name], g, atol=1e-10, rtol=1e-8, msg=name)


def test_gradcheck_chunked():
    # key_value_init_range 0.02 (SPEC section 9): every stop-gradient step factor is 1, so the analytic
    # gradient is the full derivative (with the default 0.3, M_k/M_v's W2 step bound is active at init).
    model = tiny_model(seed=4, dtype=torch.float64, mixer="self_modifying", memory_type="deep",
                       cms_chunk_sizes=[3], num_hidden_layers=1, key_value_init_range=0.02).train()
    ids = torch.randint(3, 61, (1, 9), generator=torch.Generator().manual_seed(5))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    probe = torch.randn(1, 9, 61, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.autograd.gradcheck(lambda e: (model(inputs_embeds=e).logits * probe).sum(), (embeds,), eps=1e-6, atol=1e-6)


def reference_chunk(weight, unit, write_per_eta, eta, alpha):
    """The recurrence `W (alpha I - eta u u^T) + eta r u^T`, one token at a time."""
    for t in range(unit.shape[-2]):
        u, w = unit[..., t, :], eta[..., t, None] * write_per_eta[..., t, :]
        projected = (weight @ u.unsqueeze(-1)).squeeze(-1)
        weight = alpha[..., t, None, None] * weight + (w - eta[..., t, None] * projected).unsqueeze(-1) * u.unsqueeze(-2)
    return weight


@pytest.mark.parametrize("length", [1, 2, 5, 16, 33])
def test_dgd_chunk_closed_form(length):
    gen = torch.Generator().manual_seed(length)
    shape = (2, 3)
    weight = torch.randn(*shape, 4, 6, dtype=torch.float64, generator=gen)
    unit = l2norm(torch.randn(*shape, length, 6, dtype=torch.float64, generator=gen), 1e-6)
    write = torch.randn(*shape, length, 4, dtype=torch.float64, generator=gen)
    eta = torch.rand(*shape, length, dtype=torch.float64, generator=gen)
    alpha = torch.rand(*shape, length, dtype=torch.float64, generator=gen) * 0.5 + 0.5
    alpha[0, 0, length // 2] = 0.0  # a full reset stays exact (log floor)
    expected = reference_chunk(weight, unit, write, eta, alpha)
    got = dgd_chunk(weight, unit, write, eta, alpha.log().clamp(min=-1e4))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("memory_type", ["deep", "linear"])
def test_dgd_terms_reproduce_dgd_step(memory_type):
    """One token: the DGD equation `W (alpha I - eta u~u~^T) - eta / max(1, ||u||^2) e u^T`, written out
    from the gradient factors, equals `dgd_naive.dgd_step` and the closed-form chunk of one token, both
    fed by `dgd_terms`."""
    gen = torch.Generator().manual_seed(3)
    B, H, D, M = 2, 3, 4, 5
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)
    state = {"W1": r(B, H, D, M), "W2": r(B, H, M, D)} if memory_type == "deep" else {"W": r(B, H, D, D)}
    current = {k: v + 0.1 * r(*v.shape) for k, v in state.items()}
    key, target = l2norm(r(B, H, D), 1e-6) * 3.0, r(B, H, D)
    eta, alpha = torch.rand(B, H, dtype=torch.float64, generator=gen), torch.rand(B, H, dtype=torch.float64, generator=gen)
    expected = {}
    for name, (e, u) in gradient_factors(state, key.unsqueeze(-2), target.unsqueeze(-2), "gelu").items():
        e, u = e.squeeze(-2), u.squeeze(-2)
        unit = l2norm(u, 1e-6)
        erase = (current[name] @ unit.unsqueeze(-1)) @ unit.unsqueeze(-2)
        step = eta[..., None, None] / (u * u).sum(-1).clamp(min=1.0)[..., None, None]
        expected[name] = (alpha[..., None, None] * current[name] - eta[..., None, None] * erase
                          - step * e.unsqueeze(-1) * u.unsqueeze(-2))
    terms = dgd_terms(state, key.unsqueeze(-2), target.unsqueeze(-2), "gelu", 1e-6)
    stepped = dgd_step(current, {n: (a.squeeze(-2), b.squeeze(-2)) for n, (a, b) in terms.items()}, eta, alpha)
    for name, (unit, write) in terms.items():
        torch.testing.assert_close(stepped[name], expected[name], atol=1e-12, rtol=0)
        got = dgd_chunk(current[name], unit, write, eta.unsqueeze(-1), alpha.log().unsqueeze(-1))
        torch.testing.assert_close(got, expected[name], atol=1e-12, rtol=0)


@pytest.mark.parametrize("self_generated", [False, True])
@pytest.mark.parametrize("bounded", [False, True])
def test_linear_dgd_terms_are_the_step_at_the_current_state(self_generated, bounded):
    """`linear_dgd_terms` splits a linear memory's DGD step with its gradient (and a self-generated target
    W v^) at the current state W into `W (alpha I + eta a u~^T) + eta r u~^T`: equal to `dgd_step` fed by
    `dgd_terms` at that state, and to the chunk solve of one token and of a 7-token chunk against the
    per-token loop (float64, random keys of any norm, eta up to 2)."""
    from hope_hf.models.hope.dgd_chunk import ChunkSolve
    from hope_hf.models.hope.primitives import linear_dgd_terms

    gen = torch.Generator().manual_seed(11 + 2 * self_generated + bounded)
    B, H, D, C = 2, 3, 4, 7
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    weight = r(B, H, D, D)
    key = r(B, H, C, D) * (0.2 + 2 * torch.rand(B, H, C, 1, dtype=torch.float64, generator=gen))
    value = r(B, H, C, D)
    target_key = l2norm(value, 1e-6) if self_generated else None
    eta = 2 * torch.rand(B, H, C, dtype=torch.float64, generator=gen)
    alpha = torch.rand(B, H, C, dtype=torch.float64, generator=gen)
    unit, erase, write = linear_dgd_terms(key, None if self_generated else value, target_key, 1e-6,
                                          eta if bounded else None)
    state, states = weight, []
    for t in range(C):  # the definition: dgd_terms at the current state, one token at a time
        target = (state @ target_key[..., t, :, None]).squeeze(-1) if self_generated else value[..., t, :]
        terms = dgd_terms({"W": state}, key[..., t:t + 1, :], target.unsqueeze(-2), "silu", 1e-6,
                          None if target_key is None else target_key[..., t:t + 1, :],
                          eta[..., t:t + 1] if bounded else None)
        state = dgd_step({"W": state}, {"W": (terms["W"][0][..., 0, :], terms["W"][1][..., 0, :])},
                         eta[..., t], alpha[..., t])["W"]
        states.append(state)
    one = ChunkSolve(weight, unit[..., :1, :], write[..., :1, :], eta[..., :1], alpha[..., :1].log(),
                     erase_per_eta=erase[..., :1, :])
    torch.testing.assert_close(one.end(), states[0], atol=1e-12, rtol=0)
    whole = ChunkSolve(weight, unit, write, eta, alpha.log(), erase_per_eta=erase)
    torch.testing.assert_close(whole.end(), states[-1], atol=1e-10, rtol=0)
    z = r(B, H, C, D)  # the per-token reads W_{t-1} z_t
    before = torch.stack([weight] + states[:-1], dim=-3)  # [B, H, C, D, D]
    torch.testing.assert_close(whole.reads(z), (before @ z.unsqueeze(-1)).squeeze(-1), atol=1e-10, rtol=0)


def test_chunk_grid_aligns_samples():
    """Each sample's real tokens go to `seen % C + rank`; chunks complete per sample."""
    seen = torch.tensor([0, 3, 5])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    grid = ChunkGrid(seen, mask, chunk_size=4)
    # offsets 0, 3, 1; positions cover [0, 6): sample 1 ends at 3 + 4 = 7.
    assert (grid.lo, grid.length) == (0, 7)
    assert grid.segments == [(0, 4), (4, 7)]
    assert grid.completes[0] is True and grid.completes[1] is False
    # padding reads where the sample's next real token reads: all in the first chunk here
    samples, tokens = grid.pads[0]
    assert list(zip(samples.tolist(), tokens.tolist())) == [(1, 0), (1, 1), (2, 0)] and grid.pads[1] is None
    x = torch.arange(18, dtype=torch.float64).view(3, 6) + 1
    g = grid.scatter(x)
    assert g[0].tolist() == [1, 2, 3, 4, 5, 6, 0]
    assert g[1].tolist() == [0, 0, 0, 9, 10, 11, 12]
    assert g[2].tolist() == [0, 14, 15, 16, 17, 18, 0]
    back = grid.gather(g)
    torch.testing.assert_close(back, x * mask)
    assert grid.active[1].tolist() == [False, False, False, True, True, True, True]


def test_scan_implementation_selection():
    model = tiny_model(seed=0)
    mixer = model.model.layers[0].mixer
    assert model.config.scan_implementation == "chunked"
    assert mixer.scans.self_modifying_titans is self_modifying_titans_chunk
    assert SCANS["chunked"].titans is titans_chunk and SCANS["chunked"].cms is cms_chunk
    with scan_implementation(model, "reference"):
        assert model.config.scan_implementation == "reference"
        assert mixer.scans.self_modifying_titans is self_modifying_titans_naive
        assert SCANS["reference"].titans is titans_naive and SCANS["reference"].cms is cms_naive
    assert model.config.scan_implementation == "chunked"  # restored
    assert HopeForCausalLM(tiny_config(scan_implementation="reference")).model.layers[0].mixer.scans is SCANS["reference"]
    with pytest.raises(ValueError, match="scan_implementation must be one of"):
        with scan_implementation(model, "triton"):
            pass
    with pytest.raises(ValueError, match="scan_implementation must be one of"):
        tiny_config(scan_implementation="fast")


def test_bf16_autocast_training_keeps_float32_state():
    model = tiny_model(seed=2).train()
    ids = torch.randint(3, 61, (2, 30), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, use_cache=True)
        generated = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 11)
    for layer in output_cache(out).layers:
        for name, tensor in layer.state.flatten().items():
            if tensor.is_floating_point() and name not in ("conv",):
                assert tensor.dtype == torch.float32, name
    with torch.no_grad():
        full = model(ids).logits
    # bf16 matmuls: close to the float32 logits, not equal.
    assert (out.logits.float() - full).abs().max() < 0.1


@pytest.mark.parametrize("cuts", [[5], [7, 8, 9], [3, 14]])
def test_gradients_through_a_cache_equal_reference(cuts):
    """Training across calls (truncated BPTT with a cache): the open chunk's buffered inputs and
    the carried fast weights pass gradients back to the earlier call, as in the reference."""
    overrides = dict(mixer="self_modifying", memory_type="deep", cms_chunk_sizes=[4, 6, None], chunk_size=3,
                     memory_chunk_size=4, memory_read="token" if len(cuts) > 1 else "chunk")
    ids = torch.randint(3, 61, (2, 18), generator=torch.Generator().manual_seed(sum(cuts)))
    grads = {}
    for name in ("chunked", "reference"):
        model = tiny_model(seed=len(cuts), dtype=torch.float64, **overrides).train()
        with scan_implementation(model, name):
            total, cache = 0.0, None
            bounds = [0, *cuts, ids.shape[1]]
            for a, b in zip(bounds[:-1], bounds[1:]):
                out = model(ids[:, a:b], labels=ids[:, a:b], cache=cache, use_cache=True)
                total, cache = total + out.loss, output_cache(out)
        total.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads["chunked"][name], g, atol=1e-10, rtol=1e-8, msg=name)


def test_recomputed_scan_gives_identical_gradients():
    """scan_recompute_threshold trades compute for memory; outputs and gradients are unchanged."""
    ids = torch.randint(3, 61, (2, 29), generator=torch.Generator().manual_seed(9))
    results = []
    for threshold in (None, 0):
        model = tiny_model(seed=9, dtype=torch.float64, chunk_size=2, memory_chunk_size=3,
                           scan_recompute_threshold=threshold).train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=1e-12, rtol=0, msg=name)
    with pytest.raises(ValueError, match="scan_recompute_threshold"):
        tiny_config(scan_recompute_threshold=-1)


def test_cms_update_is_the_normalised_step():
    """One complete chunk: theta' = alpha theta - eta / max(1, sum_t ||u_t||^2 g_t) sum_t grad_t, per
    weight with its own layer input u (n for gate/up, the hidden activation for down) and gain g: the
    squared Frobenius norm of d out / d (the layer's pre-activation), at least 1 (1 for down). The gains
    are checked here against autograd Jacobians."""
    gen = torch.Generator().manual_seed(21)
    B, C, D, I = 2, 4, 5, 7
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    theta = {"gate": r(B, I, D), "up": r(B, I, D), "down": r(B, D, I)}
    n, value = r(B, C, D) * 2.0, r(D, D)
    eta, alpha = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)
    _, end = cms_naive(n=n, state=CMSState(theta, None, torch.zeros(B, dtype=torch.long)),
                       seen=torch.zeros(B, dtype=torch.long), mask=torch.ones(B, C, dtype=torch.bool), value_weight=value,
                       eta=eta, alpha=alpha, chunk_size=C, updates=True)
    new, buffer, updates = end.theta, end.buffer, end.num_updates
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}  # the chunk's summed gradient, by autograd
    hidden = F.silu(torch.einsum("bid,btd->bti", leaves["gate"], n)) * torch.einsum("bid,btd->bti", leaves["up"], n)
    out = torch.einsum("bdi,bti->btd", leaves["down"], hidden)
    total_grad = dict(zip(leaves, torch.autograd.grad(0.5 * ((out - n @ value.t()) ** 2).sum(), list(leaves.values()))))

    def gain(b, t, layer):  # ||d out / d pre-activation||_F^2 of sample b, token t, at least 1
        x = n[b, t]
        gate, up = theta["gate"][b] @ x, theta["up"][b] @ x
        if layer == "gate":
            jac = torch.autograd.functional.jacobian(lambda g: theta["down"][b] @ (F.silu(g) * up), gate)
        else:
            jac = torch.autograd.functional.jacobian(lambda u: theta["down"][b] @ (F.silu(gate) * u), up)
        return max(1.0, float((jac ** 2).sum()))

    energy = {name: torch.tensor([sum(float((n[b, t] ** 2).sum()) * gain(b, t, name) for t in range(C)) for b in range(B)],
                                 dtype=torch.float64) for name in ("gate", "up")}
    energy["down"] = (hidden.detach() ** 2).sum((1, 2))
    gains = torch.tensor([[gain(b, t, "gate") for t in range(C)] for b in range(B)])
    assert bool((gains > 1).any())  # the gains are active somewhere
    assert all(bool((e > 1).all()) for e in energy.values())  # the normaliser is active
    for name in ("gate", "up", "down"):
        expected = alpha * theta[name] - eta * total_grad[name] / energy[name].view(-1, 1, 1)
        torch.testing.assert_close(new[name], expected, atol=1e-12, rtol=0)
    assert updates.tolist() == [1, 1] and bool((buffer == 0).all())


def test_cms_levels_stay_finite_on_long_inputs_with_large_rates():
    """The normalised step keeps fast weights bounded where the unnormalised sum diverged
    (NaN after a few chunks of RMS-normalised inputs at eta = 1e-3, C >= 8)."""
    model = tiny_model(seed=13, hidden_size=32, num_heads=2, cms_chunk_sizes=[8, 32, None], cms_eta_init=1.5,
                       cms_alpha_init=0.999)
    ids = torch.randint(3, 61, (1, 600), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert bool(torch.isfinite(out.logits).all())
    for layer in output_cache(out).layers:
        for name, tensor in layer.state.flatten().items():
            if tensor.is_floating_point():
                assert bool(torch.isfinite(tensor).all()), name
    assert int(output_cache(out).cms_update_counts(0)[0][0]) == 75


@pytest.mark.parametrize("length", [16, 13])
def test_cms_training_path_frees_its_outputs(length):
    """The hand-written CMS backward keeps no reference cycle: once a step's outputs are dropped,
    its fast weights are freed without waiting for the garbage collector."""
    import gc
    import weakref

    model = tiny_model(seed=15, mixer="attention", cms_chunk_sizes=[4, None]).train()
    ids = torch.randint(3, 61, (2, length), generator=torch.Generator().manual_seed(16))
    gc.disable()
    try:
        out = model(ids, labels=ids, use_cache=True)
        weight = weakref.ref(output_cache(out).layers[0].state.cms[0].theta["gate"])
        out.loss.backward()
        del out
        assert weight() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("length", [24, 21, 72])
def test_cms_hand_backward_equals_reference_where_the_gains_are_active(length):
    """`CMSChunkFunction` (aligned training batch, hand-derived backward) against autograd through
    `cms_naive`, with weights large enough that the gains and every normaliser are
    above 1: outputs, end weights and the gradients of inputs, target weight, eta, alpha, weights."""
    gen = torch.Generator().manual_seed(1000 + length)
    B, C, D, I = 2, 4, 6, 9
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    leaves = {"n": r(B, length, D), "value": r(D, D) * 0.5, "gate": r(I, D), "up": r(I, D), "down": r(D, I),
              "eta": torch.tensor(0.2, dtype=torch.float64), "alpha": torch.tensor(0.95, dtype=torch.float64)}
    probe = r(B, length, D)
    results = {}
    for name, scan in (("fast", cms_chunk), ("reference", cms_naive)):
        x = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        theta = {k: x[k].unsqueeze(0).expand(B, *x[k].shape) for k in ("gate", "up", "down")}
        zeros = torch.zeros(B, dtype=torch.long)
        y, state = scan(n=x["n"], state=CMSState(theta, None, zeros), seen=zeros,
                        mask=torch.ones(B, length, dtype=torch.bool), value_weight=x["value"], eta=x["eta"],
                        alpha=x["alpha"], chunk_size=C, updates=True)
        end, updates = state.theta, state.num_updates
        loss = (y * probe).sum() + sum((end[k] ** 2).sum() for k in end) * 1e-3
        loss.backward()
        results[name] = (y.detach(), {k: v.detach() for k, v in end.items()}, {k: v.grad for k, v in x.items()}, updates)
    (y_f, end_f, grad_f, upd_f), (y_r, end_r, grad_r, upd_r) = results["fast"], results["reference"]
    assert upd_f.tolist() == upd_r.tolist() == [length // C] * B
    torch.testing.assert_close(y_f, y_r, atol=1e-10, rtol=1e-10)
    for k in end_r:
        torch.testing.assert_close(end_f[k], end_r[k], atol=1e-10, rtol=1e-10, msg=k)
    for k in grad_r:
        torch.testing.assert_close(grad_f[k], grad_r[k], atol=1e-9, rtol=1e-8, msg=k)
    # the regime under test: gains above 1 at the first chunk
    first = SwiGLUPass([leaves[k] for k in ("gate", "up", "down")], leaves["n"][:, :1], leaves["n"][:, :1])
    assert bool((torch.stack([first.gain_gate, first.gain_up]) > 1).all())


@pytest.mark.parametrize("memory_type,memory_read,seed", [("deep", "token", 0), ("deep", "chunk", 1), ("linear", "token", 2)])
def test_token_by_token_decoding_equals_reference(memory_type, memory_read, seed):
    """Single-token calls (the decoding path: all five memories stepped together, `_self_modifying_token`)
    against one reference call, with left padding and a pad in the middle, across chunk boundaries."""
    model = tiny_model(seed=seed, dtype=torch.float64, memory_type=memory_type, memory_read=memory_read, chunk_size=3,
                       memory_chunk_size=5, cms_chunk_sizes=[4, None])
    ids, mask = padded_batch(seed, 23, [0, 3])
    mask[1, 10] = 0
    with torch.no_grad():
        with scan_implementation(model, "reference"):
            ref = model(ids, attention_mask=mask).logits
        cache, steps = None, []
        for t in range(ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
            cache = output_cache(out)
            steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], ref[real], atol=1e-10, rtol=0)


def test_compiled_chunks_equal_eager():
    """`compile_chunks=True` (torch.compile of the chunked path's per-chunk steps) gives the eager
    path's loss, end states and parameter gradients (float32, 1e-5) in training, over several
    chunks of every memory."""
    from torch._dynamo.utils import counters

    kwargs = dict(chunk_size=2, memory_chunk_size=3, cms_chunk_sizes=[2, None])
    models = {"eager": tiny_model(seed=6, **kwargs), "compiled": tiny_model(seed=6, compile_chunks=True, **kwargs)}
    ids = torch.randint(3, 61, (2, 12), generator=torch.Generator().manual_seed(7))
    graphs_before = counters["stats"]["unique_graphs"]
    losses, grads, states = {}, {}, {}
    for name, model in models.items():
        model.train()
        out = model(ids, labels=ids, use_cache=True)
        out.loss.backward()
        losses[name] = out.loss.detach()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        states[name] = flat_state(output_cache(out))
    assert counters["stats"]["unique_graphs"] > graphs_before  # the steps were compiled, not run eagerly
    torch.testing.assert_close(losses["compiled"], losses["eager"], atol=1e-5, rtol=1e-5)
    assert grads["compiled"].keys() == grads["eager"].keys() and any("memories" in n for n in grads["eager"])
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["compiled"][n], g, atol=1e-5, rtol=1e-5, msg=n)
    for n, state in states["eager"].items():
        torch.testing.assert_close(states["compiled"][n].detach(), state.detach(), atol=1e-5, rtol=1e-5, msg=n)


def test_compiled_chunks_prefill_with_padding_equals_eager():
    """`compile_chunks=True` without gradients on a left-padded batch with a pad in the middle (the
    padding branches of the compiled steps): logits at real tokens and end states equal the eager path
    (float32, 1e-5)."""
    from torch._dynamo.utils import counters

    kwargs = dict(chunk_size=2, memory_chunk_size=3, cms_chunk_sizes=[2, None])
    models = {"eager": tiny_model(seed=8, **kwargs), "compiled": tiny_model(seed=8, compile_chunks=True, **kwargs)}
    ids, mask = padded_batch(9, 13, [0, 4])
    mask[0, 6] = 0
    logits, states = {}, {}
    frames_before = counters["frames"]["ok"]
    with torch.no_grad():
        for name, model in models.items():
            out = model(ids, attention_mask=mask, use_cache=True)
            logits[name], states[name] = out.logits, flat_state(output_cache(out))
    assert counters["frames"]["ok"] > frames_before  # the steps went through Dynamo, not eagerly
    real = mask.bool()
    torch.testing.assert_close(logits["compiled"][real], logits["eager"][real], atol=1e-5, rtol=1e-5)
    for n, state in states["eager"].items():
        torch.testing.assert_close(states["compiled"][n], state, atol=1e-5, rtol=1e-5, msg=n)


def test_compiled_decoding_equals_eager():
    """`compile_decoding=True` (torch.compile of each block's single-token step) gives the eager step's
    logits and states (float32, 1e-5), across chunk boundaries of every memory and CMS level (two
    dynamic levels, samples out of phase, a padding token mid-stream), in one graph: no graph break."""
    from torch._dynamo.utils import counters

    kwargs = dict(chunk_size=2, memory_chunk_size=3, cms_chunk_sizes=[2, 3, None])
    eager, compiled = tiny_model(seed=4, **kwargs), tiny_model(seed=4, compile_decoding=True, **kwargs)
    ids = torch.randint(3, 61, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 0] = 0  # sample 1 is one token behind sample 0 on every chunk grid
    mask[0, 6] = 0  # and a padding token while decoding
    caches, logits = {}, {}
    breaks_before = sum(counters["graph_break"].values())
    with torch.no_grad():
        for name, model in (("eager", eager), ("compiled", compiled)):
            cache = output_cache(model(ids[:, :3], attention_mask=mask[:, :3], use_cache=True))
            steps = []
            for t in range(3, ids.shape[1]):
                out = model(ids[:, t:t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
                cache = output_cache(out)
                steps.append(out.logits)
            caches[name], logits[name] = cache, torch.cat(steps, dim=1)
    real = mask[:, 3:].bool()
    torch.testing.assert_close(logits["compiled"][real], logits["eager"][real], atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] > 0  # the step was compiled, not run eagerly
    assert sum(counters["graph_break"].values()) == breaks_before, dict(counters["graph_break"])
    a, b = flat_state(caches["eager"]), flat_state(caches["compiled"])
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-5, msg=name)
