"""HOPE adapter on Llama: equivalence at init, streaming, generate, frozen base, LoRA, save/load, errors."""

import copy
import os
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hope_hf import HopeConfig, HopeForCausalLM
from hope_hf.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    HopeAdapterConfig,
    HopeLlamaCache,
    HopeLlamaForCausalLM,
    adapter_state_dict,
    apply_hope_adapter,
    freeze_base,
    load_hope_adapter,
    save_hope_adapter,
)
from hope_hf.optim import MultiFrequency, build_multi_frequency_groups, hope_cms_periods

from conftest import tiny_config
from hope_hf.models.hope.hf_compat import output_cache

VOCAB = 53


def tiny_llama(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).eval()


def adapter_config(**overrides) -> HopeAdapterConfig:
    """Short chunks so that every in-context update fires within ~20 tokens."""
    kwargs = dict(layers=[0, -1], cms_chunk_sizes=[2, 5], cms_intermediate_size=16, num_heads=2, chunk_size=3,
                  memory_chunk_size=4, hope_kwargs=dict(eta_init=0.3, alpha_init=0.9, cms_eta_init=0.05,
                                                         cms_alpha_init=0.95))
    kwargs.update(overrides)
    return HopeAdapterConfig(**kwargs)


def perturb_adapter(model: HopeLlamaForCausalLM, seed: int) -> None:
    """Move the adapter away from its (function-preserving) init, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.adapter_named_parameters():
            if name.endswith(("hope_gate", "down_proj.weight", "value_proj.weight")):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def adapted(seed: int = 0, dtype=torch.float32, perturb: bool = True, **overrides) -> HopeLlamaForCausalLM:
    model = apply_hope_adapter(tiny_llama(seed, dtype), adapter_config(**overrides))
    if perturb:
        perturb_adapter(model, seed + 1)
    return model


def random_ids(seed: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- equivalence at init (paper arXiv section 7.3) ----------------------------------------------
@pytest.mark.parametrize("self_modifying", [True, False])
def test_logits_equal_pretrained_at_init(self_modifying):
    base = tiny_llama(seed=3)
    reference = copy.deepcopy(base)
    model = apply_hope_adapter(base, adapter_config(self_modifying=self_modifying, layers=None))
    assert model is base and isinstance(model, HopeLlamaForCausalLM)
    ids = random_ids(4, batch=2, length=23)  # many chunks of every added level
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            want = reference(ids, **kwargs).logits
            got = model(ids, **kwargs).logits
            assert (want - got).abs().max().item() < 1e-5
    # The adapter is there: a moved gate / level changes the function.
    perturb_adapter(model, seed=5)
    with torch.no_grad():
        assert (reference(ids).logits - model(ids).logits).abs().max().item() > 1e-3


def test_pretrained_level_in_context_is_exact_with_zero_inner_rate():
    """With the pretrained MLP updating in context (mlp_chunk_size), the model equals the pretrained
    one until the first slow chunk completes; with the inner rate at zero (and retention one) always."""
    base = tiny_llama(seed=6)
    reference = copy.deepcopy(base)
    model = apply_hope_adapter(base, adapter_config(mlp_chunk_size=8))
    ids = random_ids(7, batch=2, length=20)
    with torch.no_grad():
        want = reference(ids).logits
        got = model(ids).logits
        assert (want[:, :8] - got[:, :8]).abs().max().item() < 1e-5  # chunk-start weights = pretrained
        assert (want[:, 8:] - got[:, 8:]).abs().max().item() > 1e-6  # the level has learned in context
        for layer in model.adapted_layers().values():
            layer.mlp.eta_logit.fill_(-1e4)  # softplus -> exactly 0
            layer.mlp.alpha_logit.fill_(1e4)  # sigmoid -> exactly 1
        assert (want - model(ids).logits).abs().max().item() < 1e-5


# --- streaming contract ---------------------------------------------------------------------------
def _hope_states(cache: HopeLlamaCache):
    return {i: layer.state.flatten() for i, layer in cache.hope_layers.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_any_split_equals_one_pass(seed):
    model = adapted(seed=seed, dtype=torch.float64)
    ids = random_ids(seed + 10, batch=2, length=21)
    rng = random.Random(seed)
    with torch.no_grad():
        full = model(ids, use_cache=True)
        cuts = sorted(rng.sample(range(1, 20), 4))
        pieces = list(zip([0] + cuts, cuts + [21])) + [(21, 21)]
        cache, logits = None, []
        for start, stop in pieces[:-1]:
            out = model(ids[:, start:stop], cache=cache, use_cache=True)
            cache = output_cache(out)
            logits.append(out.logits)
    assert (torch.cat(logits, dim=1) - full.logits).abs().max().item() < 1e-10
    one, many = _hope_states(output_cache(full)), _hope_states(cache)
    assert one.keys() == many.keys() and all(one[i].keys() == many[i].keys() for i in one)
    for i in one:
        for key in one[i]:
            assert (one[i][key].double() - many[i][key].double()).abs().max().item() < 1e-10, key
    assert torch.equal(output_cache(full).seen_tokens, cache.seen_tokens)
    assert cache.cms_update_counts(0)[0].tolist() == [10, 10]  # 21 tokens, chunks of 2
    assert cache.cms_update_counts(0)[2] is None  # the pretrained MLP is static here


def test_left_padding_equals_alone():
    model = adapted(seed=2, dtype=torch.float64)
    short, long = random_ids(20, 1, 13), random_ids(21, 1, 19)
    ids = torch.cat([torch.cat([torch.zeros(1, 6, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, use_cache=True)
        alone = [model(x, use_cache=True) for x in (short, long)]
        # Continue both streams by 5 tokens with a mask over this call's tokens only.
        more = random_ids(22, 2, 5)
        batch_next = model(more, attention_mask=torch.ones_like(more), cache=output_cache(batch))
        alone_next = [model(more[i:i + 1], cache=output_cache(alone[i])) for i in range(2)]
    assert (batch.logits[0, 6:] - alone[0].logits[0]).abs().max().item() < 1e-10
    assert (batch.logits[1] - alone[1].logits[0]).abs().max().item() < 1e-10
    for i in range(2):
        assert (batch_next.logits[i] - alone_next[i].logits[0]).abs().max().item() < 1e-10
    counts = output_cache(batch).cms_update_counts(2)
    assert counts[0].tolist() == [9, 12]  # 13 + 5 and 19 + 5 real tokens, chunks of 2: padding is not counted


# --- generate -------------------------------------------------------------------------------------
def test_generate_greedy_beam_and_continuation():
    model = adapted(seed=4, dtype=torch.float64)
    model.generation_config.pad_token_id = 0
    prompt = random_ids(30, 2, 7)
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        greedy = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False)
        sequence = prompt
        for _ in range(6):  # the same without any cache: a full forward per token
            step = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, step], dim=1)
        assert torch.equal(greedy, sequence)
        beams = [model.generate(prompt, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False,
                                use_cache=use_cache) for use_cache in (True, False)]
        assert torch.equal(beams[0], beams[1])
        # Continue from a returned cache: equal to one generate() on the concatenated prompt.
        first = model.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False,
                               return_dict_in_generate=True)
        extra = random_ids(31, 2, 3)
        longer = torch.cat([first.sequences, extra], dim=1)
        resumed = model.generate(longer, attention_mask=torch.ones_like(longer), cache=output_cache(first),
                                 max_new_tokens=4, do_sample=False)
        direct = model.generate(longer, attention_mask=torch.ones_like(longer), max_new_tokens=4, do_sample=False)
    assert torch.equal(resumed, direct)
    with pytest.raises(ValueError, match="cannot be cropped"):
        output_cache(first).crop(-1)


def test_cache_batch_select_and_reorder_index_every_piece():
    model = adapted(seed=5, dtype=torch.float64)
    ids = random_ids(40, 3, 9)
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
        selected = copy.deepcopy(cache)
        selected.batch_select_indices(torch.tensor([2, 0]))
        reordered = copy.deepcopy(cache)
        reordered.reorder_cache(torch.tensor([2, 0, 1]))
        more = random_ids(41, 3, 4)
        want = model(more, cache=cache).logits
        got_selected = model(more[[2, 0]], cache=selected).logits
        got_reordered = model(more[[2, 0, 1]], cache=reordered).logits
    assert (want[[2, 0]] - got_selected).abs().max().item() < 1e-12
    assert (want[[2, 0, 1]] - got_reordered).abs().max().item() < 1e-12


# --- training ---------------------------------------------------------------------------------------
def _train_steps(model, steps: int, seed: int, lr: float = 1e-2) -> list:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)  # every parameter on purpose
    ids = random_ids(seed, 2, 16)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_frozen_base_is_bit_identical_after_training():
    model = adapted(seed=7, perturb=False)
    adapter_names = {name for name, _ in model.adapter_named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = freeze_base(model)
    assert trainable == sum(p.numel() for _, p in model.adapter_named_parameters())
    losses = _train_steps(model, steps=3, seed=8)
    assert all(torch.isfinite(torch.tensor(losses)))
    for name, p in model.named_parameters():
        if name not in adapter_names:
            assert torch.equal(p, before[name]), name  # bit-identical
    moved = {name for name in adapter_names if not torch.equal(dict(model.named_parameters())[name], before[name])}
    assert {"model.layers.0.hope_gate", "model.layers.2.hope_cms.levels.0.down_proj.weight"} <= moved


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = adapted(seed=9, dtype=torch.float64)
        freeze_base(model)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        ids = random_ids(10, 2, 11)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.adapter_named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max().item() < 1e-12, name


def test_cms_inner_rate_is_hope_configs_unless_given():
    """The added and the pretrained levels take HopeConfig's `cms_eta_init` (the normalised step is
    stable at any width); `hope_kwargs` overrides it."""
    default = HopeConfig().cms_eta_init
    for kwargs, expected in (({}, default), ({"cms_eta_init": 0.013}, 0.013)):
        adapter = HopeAdapterConfig(layers=[1], cms_chunk_sizes=[2, 5], mlp_chunk_size=8, hope_kwargs=kwargs)
        layer = apply_hope_adapter(tiny_llama(), adapter).model.layers[1]
        for level in [*layer.hope_cms.levels, layer.mlp]:
            assert torch.nn.functional.softplus(level.eta_logit).item() == pytest.approx(expected, rel=1e-5)


def test_multi_frequency_periods_of_the_adapted_levels():
    model = adapted(seed=11, perturb=False, trainable_pretrained_levels=True)
    freeze_base(model)
    periods = hope_cms_periods(model, static_period=8)
    assert periods[r"model\.layers\.0\.hope_cms\.levels\.0"] == 1
    assert periods[r"model\.layers\.0\.hope_cms\.levels\.1"] == 2  # chunk 5 // 2
    assert periods[r"model\.layers\.2\.mlp"] == 8  # the pretrained MLP: slowest level
    optimizer = MultiFrequency(torch.optim.AdamW(build_multi_frequency_groups(model, periods), lr=1e-2))
    mlp = model.model.layers[2].mlp.up_proj.weight
    start = mlp.detach().clone()
    ids = random_ids(12, 2, 12)
    model.train()
    for step in range(1, 9):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.equal(mlp, start) == (step < 8)  # stepped only at step 8


# --- LoRA (peft) and adapter save / load ----------------------------------------------------------
def test_lora_composes_trains_and_saves(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_llama(seed=12)
    fresh = copy.deepcopy(base.state_dict())
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(apply_hope_adapter(base, adapter_config()), lora)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    freeze_base(model)
    now_trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable < now_trainable and any("hope_mixer" in n for n in now_trainable - trainable)
    assert all("lora_" in n or ".hope_" in n for n in now_trainable)
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    losses = _train_steps(model, steps=3, seed=13)
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, lora_b[n]) for n, p in model.named_parameters() if n in lora_b)
    model.save_pretrained(tmp_path / "lora")
    save_hope_adapter(model, tmp_path / "hope")
    model.eval()
    ids = random_ids(14, 2, 13)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    base2 = tiny_llama(seed=99)
    base2.load_state_dict(fresh)
    reloaded = PeftModel.from_pretrained(load_hope_adapter(base2, tmp_path / "hope"), tmp_path / "lora").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, want)


def test_adapter_save_load_reapply_and_atomic_save(tmp_path, monkeypatch):
    base = tiny_llama(seed=15)
    fresh = copy.deepcopy(base.state_dict())
    model = apply_hope_adapter(base, adapter_config(mlp_chunk_size=8, trainable_pretrained_levels=True))
    perturb_adapter(model, seed=16)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # a trained pretrained level is part of the adapter
    folder = tmp_path / "adapter"
    save_hope_adapter(model, folder)
    assert sorted(os.listdir(folder)) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    saved = adapter_state_dict(model)
    assert "model.layers.0.mlp.up_proj.weight" in saved and "model.layers.0.self_attn.q_proj.weight" not in saved
    ids = random_ids(17, 2, 19)
    with torch.no_grad():
        want = model(ids).logits
    base2 = tiny_llama(seed=98)
    base2.load_state_dict(fresh)
    with torch.no_grad():
        assert not torch.equal(base2(ids).logits, want)
        reloaded = load_hope_adapter(base2, folder)
        assert torch.equal(reloaded(ids).logits, want)
    assert reloaded.hope_adapter_config == model.hope_adapter_config

    # A failing save leaves the previous adapter intact and no stray file.
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full")

    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_hope_adapter(model, folder)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before

    # Two files from different saves are refused.
    monkeypatch.undo()
    other = tmp_path / "other"
    save_hope_adapter(adapted(seed=18, perturb=False, layers=[1]), other)
    (folder / ADAPTER_CONFIG_NAME).write_bytes((other / ADAPTER_CONFIG_NAME).read_bytes())
    with pytest.raises(ValueError, match="do not belong to the same save"):
        load_hope_adapter(tiny_llama(seed=15), folder)


def test_v2_adapter_keeps_the_chunk_start_gradient_of_linear_memories(tmp_path):
    """An adapter saved as hope-adapter-v2 (before `HopeConfig.linear_gradient`) computed its linear
    memories' gradients at the chunk-start state: loading gives it `linear_gradient="chunk"`, what it
    computed with, while a v3 save keeps today's default; the two differ in their logits."""
    from safetensors.torch import load_file, save_file

    base = tiny_llama(seed=21)
    fresh = copy.deepcopy(base.state_dict())
    model = apply_hope_adapter(base, adapter_config(memory_type="linear", self_modifying=True))
    perturb_adapter(model, seed=22)
    save_hope_adapter(model, tmp_path / "v3")
    old = tmp_path / "v2"
    old.mkdir()
    text = (tmp_path / "v3" / ADAPTER_CONFIG_NAME).read_text().strip().replace("hope-adapter-v3", "hope-adapter-v2")
    (old / ADAPTER_CONFIG_NAME).write_text(text + "\n")
    save_file(load_file(str(tmp_path / "v3" / ADAPTER_WEIGHTS_NAME)), str(old / ADAPTER_WEIGHTS_NAME),
              metadata={"format": "hope-adapter-v2", "config": text})
    ids = random_ids(23, 2, 40)
    logits = {}
    for name in ("v2", "v3"):
        llama = tiny_llama(seed=21)
        llama.load_state_dict(fresh)
        loaded = load_hope_adapter(llama, tmp_path / name)
        assert loaded.hope_adapter_config.hope_kwargs.get("linear_gradient", "token") == (
            "chunk" if name == "v2" else "token")
        with torch.no_grad():
            logits[name] = loaded(ids).logits
    assert not torch.allclose(logits["v2"], logits["v3"], atol=1e-6)


def test_adapter_refuses_another_base(tmp_path):
    save_hope_adapter(adapted(seed=19), tmp_path)
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="another base model.*hidden_size"):
        load_hope_adapter(other, tmp_path)
    with pytest.raises(ValueError, match="not a saved HOPE adapter"):
        load_hope_adapter(tiny_llama(), tmp_path / "missing")


# --- errors -----------------------------------------------------------------------------------------
def test_clear_errors():
    with pytest.raises(ValueError, match="expects a transformers LlamaForCausalLM.*HopeForCausalLM"):
        apply_hope_adapter(HopeForCausalLM(tiny_config()), adapter_config())
    with pytest.raises(ValueError, match=r"layers \[3\] out of range .* 3 decoder layers \(accepted: -3 .. 2\)"):
        apply_hope_adapter(tiny_llama(), adapter_config(layers=[0, 3]))
    with pytest.raises(ValueError, match=r"layers \[0, -3\] name the same layer twice"):
        apply_hope_adapter(tiny_llama(), adapter_config(layers=[0, -3]))
    with pytest.raises(ValueError, match="already carries a HOPE adapter"):
        apply_hope_adapter(adapted(), adapter_config())
    with pytest.raises(ValueError, match="num_heads \\(5\\) must divide"):
        apply_hope_adapter(tiny_llama(), adapter_config(num_heads=5))
    with pytest.raises(ValueError, match="cms_chunk_sizes must be strictly increasing"):
        HopeAdapterConfig(cms_chunk_sizes=[8, 4])
    with pytest.raises(ValueError, match="mlp_chunk_size \\(4\\) must exceed"):
        HopeAdapterConfig(cms_chunk_sizes=[2, 4], mlp_chunk_size=4)
    with pytest.raises(ValueError, match="hope_kwargs may not set \\['hidden_size'\\]"):
        HopeAdapterConfig(hope_kwargs={"hidden_size": 8})
    with pytest.raises(ValueError, match="HopeConfig.eta_init"):
        HopeAdapterConfig(hope_kwargs={"eta_init": 2.0})
    with pytest.raises(ValueError, match="Unknown HopeAdapterConfig fields \\['layer'\\]"):
        HopeAdapterConfig.from_dict({"layer": [0]})
    llama = tiny_llama()
    llama.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act='silu'"):
        apply_hope_adapter(llama, adapter_config())
    model = adapted()
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="must be a HopeLlamaCache"):
        model(random_ids(0, 1, 3), cache=DynamicCache())
    with pytest.raises(ValueError, match="hope_context"):
        model.model(random_ids(0, 1, 3))  # the inner LlamaModel alone cannot carry the HOPE state
