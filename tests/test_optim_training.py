"""hope_hf.optim in training: least squares, bit-identical resume, Trainer and accelerate."""

from __future__ import annotations

import io
from typing import Callable

import pytest
import torch
from torch import nn

from hope_hf.optim import M3, DeepMomentum, DeltaMomentum, Muon, MultiFrequency, build_param_groups

Factory = Callable[[list], torch.optim.Optimizer]


# --------------------------------------------------------------------------- least squares
def least_squares_problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(64, 8, generator=g)
    X_true, b_true = torch.randn(8, 4, generator=g), torch.randn(4, generator=g)
    return A, A @ X_true + b_true


def mf_muon(params: list, lr: float = 0.05) -> MultiFrequency:
    X, b = params
    inner = Muon([{"params": [X], "use_muon": True, "update_period": 2}, {"params": [b], "use_muon": False}],
                 lr=lr, adamw_lr=0.05)
    return MultiFrequency(inner)


# name -> (factory, minimal factor by which 100 steps must reduce the loss)
LEAST_SQUARES: dict[str, tuple[Factory, float]] = {
    "muon": (lambda p: Muon(p, lr=0.05, adamw_lr=0.05), 10),
    # The paper's M3 accumulates its momenta without decay (it behaves like momentum 1 with an
    # AdaGrad step size), so it is markedly slower on this convex problem.
    "m3": (lambda p: M3(p, lr=0.1, slow_frequency=5, adamw_lr=0.05), 4),
    "m3_ema": (lambda p: M3(p, lr=0.03, momentum_form="ema", adamw_lr=0.05), 10),
    "delta_momentum": (lambda p: DeltaMomentum(p, lr=0.02, adamw_lr=0.05), 10),
    "delta_momentum_ns": (lambda p: DeltaMomentum(p, lr=0.05, orthogonalize=True, adamw_lr=0.05), 10),
    "deep_momentum": (lambda p: DeepMomentum(p, lr=0.02, adamw_lr=0.05), 10),
    "deep_momentum_ns": (lambda p: DeepMomentum(p, lr=0.05, orthogonalize=True, adamw_lr=0.05), 10),
    "multi_frequency": (mf_muon, 10),
}


@pytest.mark.parametrize("name", list(LEAST_SQUARES))
def test_each_optimizer_solves_least_squares(name):
    factory, factor = LEAST_SQUARES[name]
    A, Y = least_squares_problem()
    g = torch.Generator().manual_seed(1)
    X = nn.Parameter(0.1 * torch.randn(8, 4, generator=g))
    b = nn.Parameter(torch.zeros(4))
    opt = factory([X, b])
    losses = []
    for _ in range(100):
        loss = (A @ X + b - Y).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = (A @ X + b - Y).pow(2).mean().item()
    assert final < losses[0] / factor, (name, losses[0], final)


# --------------------------------------------------------------------------- resume
class SmallNet(nn.Module):
    """A matrix, a 3-D tensor (flattened to a matrix by the optimizers) and two biases."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(8, 6, generator=g) / 6**0.5)
        self.b1 = nn.Parameter(torch.zeros(8))
        self.w2 = nn.Parameter(torch.randn(3, 2, 4, generator=g) / 8**0.5)
        self.b2 = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.reshape(3, 8).T + self.b2


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=g)
    return x, torch.sin(x[:, :3]) + 0.1 * torch.randn(16, 3, generator=g)


def train(model: SmallNet, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


RESUME: dict[str, Factory] = {
    "muon": lambda p: Muon(p, lr=0.02, weight_decay=0.01),
    "m3": lambda p: M3(p, lr=1e-3, slow_frequency=3),
    "m3_ema": lambda p: M3(p, lr=1e-3, slow_frequency=3, momentum_form="ema"),
    "delta_momentum": lambda p: DeltaMomentum(p, lr=0.02),
    "deep_momentum": lambda p: DeepMomentum(p, lr=1e-2, hidden_dim=4),
    "deep_momentum_ns": lambda p: DeepMomentum(p, lr=1e-2, hidden_dim=4, orthogonalize=True),
    "multi_frequency_muon": lambda p: MultiFrequency(Muon(p, lr=0.02), update_periods=[3, 1]),
    "multi_frequency_adamw": lambda p: MultiFrequency(
        torch.optim.AdamW([{"params": p[:2], "update_period": 3}, {"params": p[2:]}], lr=1e-2), reduction="mean"
    ),
}


@pytest.mark.parametrize("name", list(RESUME))
def test_resume_after_load_state_dict_is_bit_identical(name):
    factory = RESUME[name]
    n, k = 4, 6
    model = SmallNet()
    opt = factory(list(model.parameters()))
    train(model, opt, range(n))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, range(n, n + k))  # the uninterrupted run

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = SmallNet()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = factory(list(resumed.parameters()))
    resumed_opt.load_state_dict(checkpoint["opt"])
    train(resumed, resumed_opt, range(n, n + k))
    for (pname, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), (name, pname)
    if isinstance(opt, MultiFrequency):
        assert resumed_opt.num_steps == opt.num_steps == n + k


def test_multi_frequency_state_dict_holds_pending_accumulators():
    model = SmallNet()
    opt = MultiFrequency(Muon(list(model.parameters())), update_periods=[3, 1])
    train(model, opt, range(4))  # step 4: the period-3 group has one pending gradient
    sd = opt.state_dict()
    assert sd["multi_frequency"]["step"] == 4
    assert set(sd["multi_frequency"]["accumulators"]) == {0, 1}  # w1, w2 (the matrix group)
    assert [g["update_period"] for g in sd["param_groups"]] == [3, 1]


# --------------------------------------------------------------------------- Trainer
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, length: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


TRAINER: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "muon": lambda m: Muon(build_param_groups(m), lr=0.02),
    "m3": lambda m: M3(build_param_groups(m), lr=1e-3),
    "delta_momentum": lambda m: DeltaMomentum(build_param_groups(m), lr=0.02),
    "deep_momentum": lambda m: DeepMomentum(build_param_groups(m), lr=1e-3),
    "multi_frequency": lambda m: MultiFrequency(
        Muon(build_param_groups(m, periods={r"model\.layers\.1": 2}), lr=0.02)
    ),
}


@pytest.mark.parametrize("name", list(TRAINER))
def test_trainer_runs_with_each_optimizer(name, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = TRAINER[name](model)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), optimizers=(opt, None))
    result = trainer.train()
    assert trainer.state.global_step == 3
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert "model.embed_tokens.weight" in changed
    # the scheduler Trainer built drives the groups' lr (linear decay: 3 steps -> 0)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    state = opt.state[model.model.layers[0].self_attn.q_proj.weight]
    assert state["step"] == 3  # layer 0 has period 1 under multi_frequency too


@pytest.mark.parametrize("name", ["m3", "multi_frequency"])
def test_trainer_checkpoint_resume_is_bit_identical(name, tmp_path):
    """Trainer saves optimizer.pt at step 2 and resumes from it: same weights at step 4."""
    from transformers import Trainer, TrainingArguments

    factories = {
        "m3": lambda m: M3(build_param_groups(m), lr=1e-3, slow_frequency=3),
        # layer 1 has period 3: the checkpoint at step 2 holds its pending accumulators
        "multi_frequency": lambda m: MultiFrequency(
            Muon(build_param_groups(m, periods={r"model\.layers\.1": 3}), lr=0.02)
        ),
    }

    def make_trainer(output_dir):
        model = tiny_llama()
        args = TrainingArguments(
            output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, report_to=[], use_cpu=True,
            save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(),
                          optimizers=(factories[name](model), None))
        return trainer, model

    full, full_model = make_trainer(tmp_path / "full")
    full.train()
    resumed, resumed_model = make_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (pname, p), q in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), pname


# --------------------------------------------------------------------------- accelerate
ACCELERATE: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "muon": lambda m: Muon(build_param_groups(m), lr=0.02),
    "m3": lambda m: M3(build_param_groups(m), lr=1e-3),
    "deep_momentum": lambda m: DeepMomentum(build_param_groups(m)),
    "multi_frequency": lambda m: MultiFrequency(Muon(build_param_groups(m), lr=0.02), update_periods=2),
}


@pytest.mark.parametrize("name", list(ACCELERATE))
def test_accelerate_prepare(name):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator = Accelerator(cpu=True)
    model = tiny_llama()
    opt = ACCELERATE[name](model)
    model, prepared = accelerator.prepare(model, opt)
    assert isinstance(prepared, AcceleratedOptimizer) and prepared.optimizer is opt
    data = TokenDataset()
    weight = model.model.layers[0].mlp.up_proj.weight
    before = weight.detach().clone()
    for i in range(4):
        batch_ = {k: v[None] for k, v in data[i].items()}
        loss = model(**batch_).loss
        accelerator.backward(loss)
        prepared.step()
        prepared.zero_grad()
    assert not torch.equal(weight, before)
    sd = prepared.state_dict()
    prepared.load_state_dict(sd)
    assert prepared.state_dict().keys() == sd.keys()
