"""Closed-form checks of hope_hf.optim on tiny tensors (gradients are set by hand)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hope_hf.optim import (
    M3,
    DeepMomentum,
    DeltaMomentum,
    Muon,
    MultiFrequency,
    build_multi_frequency_groups,
    build_param_groups,
    hope_cms_periods,
    newton_schulz,
)

A, B, C = 3.4445, -4.7750, 2.0315  # the quintic coefficients, written out independently


def quintic(x: float, steps: int = 5) -> float:
    """The Newton-Schulz polynomial iterated on one singular value."""
    for _ in range(steps):
        x = A * x + B * x**3 + C * x**5
    return x


def run_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


# --------------------------------------------------------------------------- Newton-Schulz
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5), (3, 7, 5)])
def test_newton_schulz_is_the_quintic_on_singular_values(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape, dtype=torch.float64)
    out = newton_schulz(G, steps=5, eps=0.0, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    norm = G.norm(dim=(-2, -1), keepdim=True).squeeze(-1)
    mapped = (S / norm).apply_(quintic)
    expected = U @ torch.diag_embed(mapped) @ Vh
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(1)
    out = newton_schulz(torch.randn(*shape))
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.5 and s.max() < 1.25, s
    assert out.dtype == torch.float32


def test_newton_schulz_bf16_and_zero():
    G = torch.randn(16, 8)
    out = newton_schulz(G, dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.4 and s.max() < 1.4
    assert torch.equal(newton_schulz(torch.zeros(3, 4)), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="ns_steps"):
        newton_schulz(G, steps=-1)


# --------------------------------------------------------------------------- Muon
def reference_muon(W: torch.Tensor, grads: list[torch.Tensor], lr: float, momentum: float) -> torch.Tensor:
    """Keller Jordan's Muon (EMA/lerp form, Nesterov), written from scratch."""
    W = W.clone()
    buf = torch.zeros_like(W)
    for g in grads:
        buf = momentum * buf + (1 - momentum) * g
        u = (1 - momentum) * g + momentum * buf
        tall = u.shape[0] > u.shape[1]
        X = u.T if tall else u
        X = X / (torch.linalg.matrix_norm(X) + 1e-7)
        for _ in range(5):
            gram = X @ X.T
            X = A * X + (B * gram + C * gram @ gram) @ X
        X = X.T if tall else X
        W = W - lr * max(1.0, W.shape[0] / W.shape[1]) ** 0.5 * X
    return W


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
def test_muon_matches_hand_rolled_reference(shape):
    torch.manual_seed(2)
    W0 = torch.randn(*shape)
    grads = [torch.randn(*shape) for _ in range(6)]
    w = nn.Parameter(W0.clone())
    opt = Muon([w], lr=0.05, momentum=0.9)
    run_steps(opt, [w], [[g] for g in grads])
    torch.testing.assert_close(w.detach(), reference_muon(W0, grads, 0.05, 0.9), atol=2e-6, rtol=1e-5)


def test_muon_conv_weight_is_flattened():
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(4, 2, 3))
    g = torch.randn(4, 2, 3)
    opt = Muon([w], lr=0.1, nesterov=False)
    before = w.detach().clone()
    run_steps(opt, [w], [[g]])
    delta = (before - w.detach()).reshape(4, 6) / 0.1
    torch.testing.assert_close(delta, newton_schulz(g.reshape(4, 6)))


def test_fallback_is_torch_adamw_bit_for_bit():
    torch.manual_seed(4)
    b1 = nn.Parameter(torch.randn(5))
    b2 = nn.Parameter(b1.detach().clone())
    grads = [torch.randn(5) for _ in range(5)]
    ours = Muon([b1], adamw_lr=1e-2, adamw_betas=(0.8, 0.9), adamw_eps=1e-6, adamw_weight_decay=0.1)
    assert ours.param_groups[0]["use_muon"] is False and ours.param_groups[0]["lr"] == 1e-2
    ref = torch.optim.AdamW([b2], lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, foreach=False)
    run_steps(ours, [b1], [[g] for g in grads])
    run_steps(ref, [b2], [[g] for g in grads])
    assert torch.equal(b1, b2)


def test_default_rule_splits_groups_by_ndim():
    w, b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3))
    opt = Muon([w, b], lr=0.02, adamw_lr=1e-3)
    assert [(g["use_muon"], g["lr"], len(g["params"])) for g in opt.param_groups] == [(True, 0.02, 1), (False, 1e-3, 1)]
    # an explicit flag is respected, an explicit lr kept
    opt = Muon([{"params": [w], "use_muon": False, "lr": 0.5}])
    assert opt.param_groups[0]["use_muon"] is False and opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="ndim >= 2"):
        Muon([{"params": [b], "use_muon": True}])


# --------------------------------------------------------------------------- M3
def test_m3_first_steps_by_hand():
    """Diagonal gradients: Newton-Schulz acts on the diagonal entries through the quintic."""
    lr, b1, b2, b3, alpha, eps, f = 0.1, 0.9, 0.5, 0.8, 0.5, 1e-3, 2
    theta0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    gs = [torch.tensor(d, dtype=torch.float64) for d in ([1.0, -2.0], [3.0, 1.0], [-1.0, 2.0], [0.5, 0.5])]
    w = nn.Parameter(theta0.clone())
    opt = M3([w], lr=lr, beta1=b1, beta2=b2, beta3=b3, alpha=alpha, eps=eps, slow_frequency=f,
             ns_dtype=torch.float64)

    def ns_diag(d: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in d)) + 1e-7  # newton_schulz's eps
        return [math.copysign(quintic(abs(x) / norm), x) if x != 0 else 0.0 for x in d]

    theta = theta0.diagonal().tolist()
    m1, v, m2, chunk = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    o2 = [0.0, 0.0]
    for t, g in enumerate(gs, start=1):
        g = g.tolist()
        m1 = [m + b1 * x for m, x in zip(m1, g)]
        v = [s + b2 * x * x for s, x in zip(v, g)]
        o1 = ns_diag(m1)
        theta = [th - lr * (a + alpha * c) / math.sqrt(s + eps) for th, a, c, s in zip(theta, o1, o2, v)]
        chunk = [c + x for c, x in zip(chunk, g)]
        if t % f == 0:
            m2 = [m + b3 * c for m, c in zip(m2, chunk)]
            chunk = [0.0, 0.0]
            o2 = ns_diag(m2)
        w.grad = torch.diag(torch.tensor(g, dtype=torch.float64))
        opt.step()
        expected = theta0.clone()
        expected[0, 0], expected[1, 1] = theta
        torch.testing.assert_close(w.detach(), expected, atol=1e-12, rtol=1e-12)
        state = opt.state[w]
        torch.testing.assert_close(state["slow_momentum"].diagonal(), torch.tensor(m2, dtype=torch.float64))
    # off-diagonal entries: O1 = O2 = V = 0 there, so they never move
    assert w[0, 1].item() == 2.0 and w[1, 0].item() == 3.0


def test_m3_slow_momentum_moves_only_at_multiples_of_f():
    torch.manual_seed(5)
    f, b3 = 3, 0.7
    w = nn.Parameter(torch.randn(4, 3))
    opt = M3([w], slow_frequency=f, beta3=b3)
    grads = [torch.randn(4, 3) for _ in range(10)]
    previous = torch.zeros(4, 3)
    for t, g in enumerate(grads, start=1):
        w.grad = g.clone()
        opt.step()
        m2 = opt.state[w]["slow_momentum"]
        if t % f == 0:
            expected = b3 * torch.stack(grads[:t]).sum(0)
            torch.testing.assert_close(m2, expected)
            torch.testing.assert_close(opt.state[w]["slow_output"], newton_schulz(expected))
            assert not torch.equal(m2, previous)
        else:
            assert torch.equal(m2, previous)
        previous = m2.clone()


def test_m3_ema_variant_is_explicit():
    w = nn.Parameter(torch.ones(2, 2))
    opt = M3([w], momentum_form="ema", beta1=0.5, beta2=0.5, lr=0.1, eps=1e-12, alpha=0.0)
    g = torch.diag(torch.tensor([2.0, 2.0]))
    w.grad = g
    opt.step()
    # EMA: M1 = g/2, V_hat = (g^2/2) / (1 - 0.5) = g^2 -> update NS(M1)/|g| on the diagonal
    ns = quintic(1 / math.sqrt(2))
    expected = torch.ones(2, 2) - 0.1 * torch.diag(torch.tensor([ns / 2, ns / 2]))
    torch.testing.assert_close(w.detach(), expected)


# --------------------------------------------------------------------------- DeltaMomentum
def test_delta_momentum_without_erase_is_sgd_momentum():
    torch.manual_seed(6)
    w1 = nn.Parameter(torch.randn(5, 3))
    w2 = nn.Parameter(w1.detach().clone())
    grads = [torch.randn(5, 3) for _ in range(5)]
    run_steps(DeltaMomentum([w1], lr=0.1, alpha=0.9, beta=0.0), [w1], [[g] for g in grads])
    run_steps(torch.optim.SGD([w2], lr=0.1, momentum=0.9, foreach=False), [w2], [[g] for g in grads])
    torch.testing.assert_close(w1, w2, atol=1e-7, rtol=1e-6)


def test_delta_momentum_erase_by_hand():
    torch.manual_seed(7)
    lr, alpha, beta = 0.1, 0.9, 0.6
    W0 = torch.randn(2, 3, dtype=torch.float64)
    g1, g2 = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    w = nn.Parameter(W0.clone())
    run_steps(DeltaMomentum([w], lr=lr, alpha=alpha, beta=beta), [w], [[g1], [g2]])
    g2_hat = g2 / torch.linalg.matrix_norm(g2)
    m1 = g1
    m2 = m1 @ (alpha * torch.eye(3, dtype=torch.float64) - beta * g2_hat.T @ g2_hat) + g2
    torch.testing.assert_close(w.detach(), W0 - lr * m1 - lr * m2)


def test_delta_momentum_tall_matrix_uses_same_rule():
    torch.manual_seed(8)
    W0, g1, g2 = (torch.randn(5, 2, dtype=torch.float64) for _ in range(3))
    w = nn.Parameter(W0.clone())
    opt = DeltaMomentum([w], lr=1.0, alpha=0.5, beta=1.0)
    run_steps(opt, [w], [[g1], [g2]])
    g2_hat = g2 / g2.norm()
    buf = g1 @ (0.5 * torch.eye(2, dtype=torch.float64) - g2_hat.T @ g2_hat) + g2
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], buf)


# --------------------------------------------------------------------------- DeepMomentum
def test_deep_momentum_linear_memory_with_newton_schulz_is_muon():
    torch.manual_seed(9)
    W0 = torch.randn(6, 4)
    grads = [torch.randn(6, 4) for _ in range(6)]
    w1, w2 = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    run_steps(DeepMomentum([w1], lr=0.05, beta=0.9, hidden_dim=0, normalize_grad=False, orthogonalize=True),
              [w1], [[g] for g in grads])
    run_steps(Muon([w2], lr=0.05, momentum=0.9, nesterov=False), [w2], [[g] for g in grads])
    torch.testing.assert_close(w1, w2, atol=2e-6, rtol=1e-5)


def test_deep_momentum_memory_learns_the_gradients():
    """Repeated gradient directions: the MLP memory's inner loss falls, and it really trains."""
    torch.manual_seed(10)
    basis = torch.linalg.qr(torch.randn(16, 3)).Q.T  # 3 directions in R^16
    w = nn.Parameter(torch.zeros(8, 16))
    opt = DeepMomentum([w], hidden_dim=4, memory_lr=0.5, beta=0.99, seed=3)

    def inner_loss(u: torch.Tensor) -> float:
        s = opt.state[w]
        u = u / u.pow(2).mean().sqrt()
        pred = s["memory_bias"] + torch.tanh(u @ s["memory_in"].T) @ s["memory_out"].T
        return (pred - u).pow(2).sum().item()

    def grad_sample() -> torch.Tensor:
        return torch.randn(8, 3) @ basis

    w.grad = grad_sample()
    opt.step()
    w_in0 = opt.state[w]["memory_in"].clone()
    probes = [grad_sample() for _ in range(20)]
    before = sum(inner_loss(u) for u in probes)
    for _ in range(200):
        w.grad = grad_sample()
        opt.step()
    after = sum(inner_loss(u) for u in probes)
    assert after < 0.7 * before, (before, after)
    assert opt.state[w]["memory_out"].abs().sum() > 0
    assert not torch.equal(opt.state[w]["memory_in"], w_in0)


def test_deep_momentum_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(11)
    g = torch.randn(3, 4)
    states = []
    for _ in range(2):
        w = nn.Parameter(torch.zeros(3, 4))
        opt = DeepMomentum([w], seed=5)
        w.grad = g.clone()
        rng = torch.get_rng_state()
        opt.step()
        assert torch.equal(rng, torch.get_rng_state())
        states.append(opt.state[w]["memory_in"])
    assert torch.equal(*states)


# --------------------------------------------------------------------------- MultiFrequency
def test_multi_frequency_period_4_steps_twice_in_8_steps():
    slow = nn.Parameter(torch.zeros(3))
    fast = nn.Parameter(torch.zeros(3))
    inner = torch.optim.SGD([{"params": [slow]}, {"params": [fast]}], lr=1.0)
    opt = MultiFrequency(inner, update_periods=[4, 1])
    changes = []
    for k in range(1, 9):
        slow.grad = torch.full((3,), float(k))
        fast.grad = torch.full((3,), float(k))
        before = slow.detach().clone()
        opt.step()
        assert torch.equal(slow.grad, torch.full((3,), float(k)))  # grads are restored
        opt.zero_grad()
        if not torch.equal(before, slow):
            changes.append(k)
    assert changes == [4, 8]
    # Eq. 31: the sum of the chunk's gradients, applied once per chunk
    assert torch.equal(slow.detach(), torch.full((3,), -float(sum(range(1, 9)))))
    assert torch.equal(fast.detach(), torch.full((3,), -float(sum(range(1, 9)))))


def test_multi_frequency_hides_skipped_groups_from_inner_state():
    slow, fast = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    inner = torch.optim.AdamW([{"params": [slow], "update_period": 4}, {"params": [fast]}], lr=0.1)
    opt = MultiFrequency(inner, reduction="mean")
    assert [g["update_period"] for g in opt.param_groups] == [4, 1]
    for k in range(8):
        slow.grad = torch.ones(2)
        fast.grad = torch.ones(2)
        opt.step()
        opt.zero_grad()
        if k == 2:
            assert len(inner.state[slow]) == 0  # never stepped yet
    assert int(inner.state[slow]["step"]) == 2
    assert int(inner.state[fast]["step"]) == 8


def test_multi_frequency_mean_reduction():
    p = nn.Parameter(torch.zeros(1))
    opt = MultiFrequency(torch.optim.SGD([p], lr=1.0), update_periods=2, reduction="mean")
    for k in (1.0, 3.0):
        p.grad = torch.tensor([k])
        opt.step()
    assert torch.equal(p.detach(), torch.tensor([-2.0]))


# --------------------------------------------------------------------------- param groups
class CMSLevel(nn.Module):
    """Stand-in for the HOPE model's CMS level (the contract: class name + `chunk_size`)."""

    def __init__(self, chunk_size):
        super().__init__()
        self.chunk_size = chunk_size
        self.up = nn.Linear(4, 8)
        self.down = nn.Linear(8, 4, bias=False)


class FakeHope(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"mixer": nn.Linear(4, 4), "norm": nn.LayerNorm(4),
                           "cms": nn.ModuleList([CMSLevel(16), CMSLevel(256), CMSLevel(None)])})
            for _ in range(2)
        )
        self.lm_head = nn.Linear(4, 10, bias=False)


def test_build_param_groups_default_rule():
    model = FakeHope()
    groups = build_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    matrix = {names[id(p)] for g in groups if g["use_muon"] for p in g["params"]}
    fallback = {names[id(p)] for g in groups if not g["use_muon"] for p in g["params"]}
    assert "embed_tokens.weight" in fallback and "lm_head.weight" in fallback
    assert "layers.0.norm.weight" in fallback and "layers.0.mixer.bias" in fallback
    assert "layers.0.mixer.weight" in matrix and "layers.1.cms.2.down.weight" in matrix
    assert len(matrix) + len(fallback) == len(list(model.parameters()))
    # override: everything 2-D is a matrix, even the embedding
    groups = build_param_groups(model, is_matrix=lambda name, p, module: p.ndim >= 2)
    matrix = {names[id(p)] for g in groups if g["use_muon"] for p in g["params"]}
    assert "embed_tokens.weight" in matrix
    opt = Muon(build_param_groups(model, fallback_options={"lr": 1e-3}))
    assert {g["lr"] for g in opt.param_groups if not g["use_muon"]} == {1e-3}


def test_hope_cms_periods_and_multi_frequency_groups():
    model = FakeHope()
    periods = hope_cms_periods(model)
    assert periods == {r"layers\.0\.cms\.0": 1, r"layers\.0\.cms\.1": 16, r"layers\.0\.cms\.2": 1,
                       r"layers\.1\.cms\.0": 1, r"layers\.1\.cms\.1": 16, r"layers\.1\.cms\.2": 1}
    assert hope_cms_periods(model, base_period=2, static_period=32)[r"layers\.0\.cms\.2"] == 32
    groups = build_multi_frequency_groups(model, periods)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: (g["use_muon"], g["update_period"]) for g in groups for p in g["params"]}
    assert by_name["layers.1.cms.1.up.weight"] == (True, 16)
    assert by_name["layers.1.cms.1.up.bias"] == (False, 16)
    assert by_name["layers.1.cms.0.up.weight"] == (True, 1)
    assert by_name["lm_head.weight"] == (False, 1)
    # a regex covering all layers at once
    groups = build_multi_frequency_groups(model, {r"layers\.\d+\.cms\.1": 4, "layers.0": 2})
    by_name = {names[id(p)]: g["update_period"] for g in groups for p in g["params"]}
    assert by_name["layers.0.cms.1.down.weight"] == 4  # longest match wins
    assert by_name["layers.0.mixer.weight"] == 2 and by_name["layers.1.mixer.weight"] == 1
    opt = MultiFrequency(Muon(groups))
    assert sorted({g["update_period"] for g in opt.param_groups}) == [1, 2, 4]


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (Muon, {"lr": -1.0}, "lr"),
        (Muon, {"momentum": 1.0}, "momentum"),
        (Muon, {"ns_steps": -1}, "ns_steps"),
        (Muon, {"ns_steps": 2.5}, "ns_steps"),
        (Muon, {"ns_dtype": torch.int32}, "ns_dtype"),
        (Muon, {"shape_scale": "big"}, "shape_scale"),
        (Muon, {"weight_decay": -0.1}, "weight_decay"),
        (Muon, {"adamw_betas": (0.9, 1.0)}, "adamw_betas"),
        (Muon, {"adamw_eps": 0.0}, "adamw_eps"),
        (M3, {"beta1": 1.0}, "beta1"),
        (M3, {"beta2": -0.1}, "beta2"),
        (M3, {"beta3": 2.0}, "beta3"),
        (M3, {"alpha": -1.0}, "alpha"),
        (M3, {"slow_frequency": 0}, "slow_frequency"),
        (M3, {"slow_frequency": 2.0}, "slow_frequency"),
        (M3, {"eps": 0.0}, "eps"),
        (M3, {"lr": float("nan")}, "lr"),
        (M3, {"momentum_form": "adam"}, "momentum_form"),
        (DeltaMomentum, {"alpha": 1.5}, "alpha"),
        (DeltaMomentum, {"beta": -0.5}, "beta"),
        (DeepMomentum, {"hidden_dim": -1}, "hidden_dim"),
        (DeepMomentum, {"memory_lr": 2.0}, "memory_lr"),
        (DeepMomentum, {"alpha": 0.0}, "alpha"),
        (DeepMomentum, {"beta": 1.0}, "beta"),
        (DeepMomentum, {"seed": -1}, "seed"),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_them(cls, kwargs, name):
    vector_only = [nn.Parameter(torch.zeros(3))]  # the matrix defaults are checked anyway
    with pytest.raises(ValueError, match=name):
        cls(vector_only, **kwargs)
    if name == "seed":  # a constructor argument, not a group key
        return
    with pytest.raises(ValueError, match=name):
        cls([{"params": [nn.Parameter(torch.zeros(2, 2))], **kwargs}])


def test_invalid_multi_frequency_arguments():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="update_period"):
        MultiFrequency(torch.optim.SGD([p], lr=0.1), update_periods=0)
    with pytest.raises(ValueError, match="update_periods"):
        MultiFrequency(torch.optim.SGD([p], lr=0.1), update_periods=[1, 2])
    with pytest.raises(ValueError, match="reduction"):
        MultiFrequency(torch.optim.SGD([p], lr=0.1), reduction="max")
    with pytest.raises(ValueError, match="periods"):
        build_param_groups(FakeHope(), periods={"layers": 0})
