"""What a fresh install and real use need beyond the math (issue: "a fresh install is broken"):
every tensor correct after from_pretrained, DDP on short sequences, half-precision weights, a
failed call that leaves the cache as it was, cache files validated, and no deprecation warnings
from our own calls on transformers 5.23 and 5.24+."""

import copy
import datetime
import os
import time
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from _scripts import run_without_hope_hf
from conftest import MEMORY_TYPES, MIXERS, tiny_config, tiny_model
from hope_hf import HopeCache, HopeConfig, HopeForCausalLM
from hope_hf.adapters import HopeAdapterConfig, apply_hope_adapter
from hope_hf.models.hope.hf_compat import CACHE_NAME, output_cache

GRID = [(mixer, memory, variant) for mixer in MIXERS for memory in ("deep", "linear")
        for variant in ("sequential", "independent")]


def ids(seed=0, length=12, batch=2, vocab=61):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- from_pretrained: every parameter and buffer, every config --------------------------------------
def _save_with_remote_code(model: HopeForCausalLM, folder) -> None:
    """save_pretrained with the modelling code copied in (loads with trust_remote_code, no hope_hf)."""
    HopeConfig.register_for_auto_class()
    HopeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    try:
        model.save_pretrained(folder)
    finally:
        HopeConfig._auto_class = HopeForCausalLM._auto_class = None


def test_save_load_every_tensor_and_buffer_for_every_config(tmp_path):
    x = ids(seed=5, length=17)
    probes = {}
    for i, (mixer, memory, variant) in enumerate(GRID):
        model = tiny_model(seed=i, dtype=torch.float64, mixer=mixer, memory_type=memory, cms_variant=variant)
        folder = tmp_path / f"{mixer}-{memory}-{variant}"
        _save_with_remote_code(model, folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, loaded.state_dict()[name]), (folder.name, name)
        buffers, loaded_buffers = dict(model.named_buffers()), dict(loaded.named_buffers())
        assert buffers.keys() == loaded_buffers.keys(), folder.name
        for name, buffer in buffers.items():
            assert torch.equal(buffer, loaded_buffers[name]), (folder.name, name)
        with torch.no_grad():
            expected, got = model(x).logits, loaded(x).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=folder.name)
        probes[folder.name] = expected
    # The same folders through trust_remote_code, in a fresh process without hope_hf (Hope-Attention's
    # RoPE must not depend on a buffer that meta-device init leaves uninitialised).
    torch.save({"x": x, "probes": probes}, tmp_path / "probe.pt")
    result = run_without_hope_hf(f"""
        import torch
        from transformers import AutoModelForCausalLM
        probe = torch.load({str(tmp_path / "probe.pt")!r})
        for name, expected in probe["probes"].items():
            folder = {str(tmp_path)!r} + "/" + name
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float64).eval()
            with torch.no_grad():
                error = (model(probe["x"]).logits - expected).abs().max()
            assert error <= 1e-12, (name, error)
        assert "hope_hf" not in sys.modules
        print("REMOTE_OK", len(probe["probes"]))
    """, tmp_path)
    assert f"REMOTE_OK {len(GRID)}" in result.stdout, result.stdout + result.stderr


# --- DDP: every parameter gets a gradient on any length ---------------------------------------------
# Chunks longer than T=8: nothing completes, so without care the projection memories, the
# eta/alpha readouts and the CMS value maps are not reached at all.
LONG_CHUNKS = dict(chunk_size=16, memory_chunk_size=64, cms_chunk_sizes=[16, None])


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_parameter_gets_a_gradient_on_short_sequences(mixer):
    model = tiny_model(seed=0, mixer=mixer, **LONG_CHUNKS).train()
    for length in (1, 8, 80):
        model.zero_grad(set_to_none=True)
        model(ids(length=length), labels=ids(length=length)).loss.backward()
        missing = [name for name, p in model.named_parameters() if p.grad is None]
        assert not missing, (length, missing)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    # a timeout turns a stuck collective into an error instead of a hung test
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        for mixer in MIXERS:
            for checkpointing in (False, True):
                torch.manual_seed(0)
                model = HopeForCausalLM(tiny_config(mixer=mixer, **LONG_CHUNKS))
                if checkpointing:
                    model.gradient_checkpointing_enable()
                model.train()
                ddp = DistributedDataParallel(model)  # find_unused_parameters=False: every parameter must be reached
                optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
                for step, length in enumerate((8, 80, 8)):
                    batch = ids(seed=100 * rank + step, length=length)  # different data on each rank
                    optimizer.zero_grad()
                    ddp(input_ids=batch, labels=batch).loss.backward()
                    optimizer.step()
                flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                gathered = [torch.zeros_like(flat) for _ in range(world)]
                dist.all_gather(gathered, flat)
                results[f"{mixer}-{checkpointing}"] = max((g - gathered[0]).abs().max().item() for g in gathered)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks tear down together (a lone destroy_process_group can hang, pytorch#75097)
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_short_and_long_sequences(tmp_path):
    import torch.multiprocessing as mp

    context = mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            written = sorted(p.name for p in tmp_path.glob("rank*.pt"))
            for process in context.processes:
                process.terminate()
            # both ranks finished the training and wrote their results: only gloo's teardown hung
            if written != ["rank0.pt", "rank1.pt"]:
                pytest.fail(f"DDP ranks did not finish within 300 s (results written: {written})")
            break
    results = torch.load(tmp_path / "rank0.pt")
    assert len(results) == 2 * len(MIXERS)
    for name, spread in results.items():
        assert spread == 0.0, (name, spread)  # the ranks' weights stay identical


# --- half-precision weights ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mixer", MIXERS)
def test_half_precision_weights_run_with_float32_state(mixer, dtype):
    reference = tiny_model(seed=3, mixer=mixer)
    half = copy.deepcopy(reference).to(dtype)
    x = ids(seed=4, length=20)
    with torch.no_grad():
        expected = reference(x).logits
        out = half(x, use_cache=True)
    assert out.logits.dtype == dtype
    assert torch.isfinite(out.logits).all()
    # Half-precision rounding of the weights and activations only: close to the float32 model.
    assert (out.logits.float() - expected).abs().max() < 0.1 * expected.abs().max()
    cache = output_cache(out)
    assert cache.state_dtype in (None, torch.float32)  # fast weights stay float32 (None: attention only)
    half.train()
    half(x, labels=x).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in half.parameters() if p.grad is not None)


def test_adapter_on_a_bf16_llama_runs_and_trains():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=53, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)
    model = apply_hope_adapter(llama, HopeAdapterConfig(layers=[0, 2], cms_chunk_sizes=[2, 4], chunk_size=2,
                                                        memory_chunk_size=4, mlp_chunk_size=8))
    x = ids(seed=1, length=12, vocab=53)
    with torch.no_grad():
        out = model.eval()(x, use_cache=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert output_cache(out).hope_state(0).cms[0].theta["gate"].dtype == torch.float32
    model.train()(x, labels=x).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_from_pretrained_bf16_generates(tmp_path):
    tiny_model(seed=5).save_pretrained(tmp_path)
    model = HopeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    out = model.generate(ids(seed=6, length=9), max_new_tokens=5, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (2, 14)
    assert output_cache(out).state_dtype == torch.float32


def test_cache_of_another_dtype_is_refused_or_converted(tmp_path):
    model64 = tiny_model(seed=7, dtype=torch.float64)
    x, follow = ids(seed=8), ids(seed=9, length=5)
    with torch.no_grad():
        cache = output_cache(model64(x, use_cache=True))
    cache.save(tmp_path / "c.safetensors")
    model32 = tiny_model(seed=7)
    loaded = HopeCache.load(tmp_path / "c.safetensors", model32.config)
    with pytest.raises(ValueError, match=r"torch\.float64.*torch\.float32"):
        model32(follow, cache=loaded)
    converted = HopeCache.load(tmp_path / "c.safetensors", model32.config, dtype=torch.float32)
    with torch.no_grad():
        want = model32(follow, cache=output_cache(model32(x, use_cache=True))).logits
        got = model32(follow, cache=converted).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- a failed call leaves the cache as it was ---------------------------------------------------------
class _FailOnce:
    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.original = module, module.forward

    def __call__(self, *args, **kwargs):
        self.module.forward = self.original  # the retry runs normally
        raise RuntimeError("injected failure")


@pytest.mark.parametrize("mixer", MIXERS)
def test_retry_after_failure_mid_forward_equals_clean_run(mixer):
    model = tiny_model(seed=10, mixer=mixer)
    prefix, follow = ids(seed=11, length=9), ids(seed=12, length=6)
    with torch.no_grad():
        cache = output_cache(model(prefix, use_cache=True))
        clean_cache = copy.deepcopy(cache)
        want = model(follow, cache=clean_cache).logits
        block = model.model.layers[1]
        block.forward = _FailOnce(block)  # layer 0 has already computed its new state when this raises
        with pytest.raises(RuntimeError, match="injected"):
            model(follow, cache=cache)
        got = model(follow, cache=cache).logits
    assert torch.equal(got, want)
    assert torch.equal(cache.seen_tokens, clean_cache.seen_tokens) and cache.seen_columns == clean_cache.seen_columns
    for mine, theirs in zip(cache.layers, clean_cache.layers):
        mine_flat, theirs_flat = mine.state.flatten(), theirs.state.flatten()
        assert mine_flat.keys() == theirs_flat.keys()
        assert all(torch.equal(mine_flat[k], theirs_flat[k]) for k in mine_flat)


def test_adapter_retry_after_failure_restores_attention_and_hope_state():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=53, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    model = apply_hope_adapter(llama, HopeAdapterConfig(layers=[0, 2], cms_chunk_sizes=[2, 4], chunk_size=2,
                                                        memory_chunk_size=4))
    with torch.no_grad():
        for p in model.parameters():  # make the added branches non-zero so their state matters
            p.add_(0.05 * torch.randn_like(p))
        prefix, follow = ids(seed=1, length=7, vocab=53), ids(seed=2, length=5, vocab=53)
        cache = output_cache(model(prefix, use_cache=True))
        clean_cache = copy.deepcopy(cache)
        want = model(follow, cache=clean_cache).logits
        level = model.model.layers[2].hope_cms
        level.forward = _FailOnce(level)  # attention of layers 0-2 and HOPE of layer 0 have run
        with pytest.raises(RuntimeError, match="injected"):
            model(follow, cache=cache)
        assert cache.get_seq_length() == clean_cache.get_seq_length() - 5
        got = model(follow, cache=cache).logits
    assert torch.equal(got, want)


# --- cache files are validated -------------------------------------------------------------------------
def _rewrite(path, transform):
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v.contiguous() for k, v in transform(tensors).items()}, str(path), metadata=metadata)


@pytest.mark.parametrize("mixer,memory,variant", GRID)
def test_saved_cache_matches_the_expected_layout(tmp_path, mixer, memory, variant):
    model = tiny_model(seed=13, mixer=mixer, memory_type=memory, cms_variant=variant)
    with torch.no_grad():
        cache = output_cache(model(ids(seed=14, length=11), use_cache=True))
        cache.save(tmp_path / "c.safetensors")
        loaded = HopeCache.load(tmp_path / "c.safetensors", model.config)  # passes validation
        follow = ids(seed=15, length=4)
        assert torch.equal(model(follow, cache=loaded).logits, model(follow, cache=cache).logits)


@pytest.mark.parametrize("damage,message", [
    (lambda t: {k: v for k, v in t.items() if k != "layers.0.mem.mem.W1"}, "missing tensor 'layers.0.mem.mem.W1'"),
    (lambda t: {k: v for k, v in t.items() if k != "layers.0.conv"}, "missing tensor 'layers.0.conv'"),
    (lambda t: {**t, "layers.1.conv": t["layers.1.conv"][:, :1]}, r"'layers\.1\.conv' has shape"),
    (lambda t: {**t, "layers.0.cms.0.num_updates": t["layers.0.cms.0.num_updates"].float()}, "dtype"),
    (lambda t: {**t, "layers.0.cms.0.gate": t["layers.0.cms.0.gate"].double()}, "mixes dtypes"),
    (lambda t: {**t, "layers.0.cms.0.buffer": t["layers.0.cms.0.buffer"].long()}, "expected a floating-point dtype"),
    (lambda t: {**t, "layers.5.extra": torch.ones(1)}, "unexpected tensor 'layers.5.extra'"),
])
def test_damaged_cache_file_is_refused(tmp_path, damage, message):
    model = tiny_model(seed=16)
    with torch.no_grad():
        output_cache(model(ids(seed=17), use_cache=True)).save(tmp_path / "c.safetensors")
    _rewrite(tmp_path / "c.safetensors", damage)
    with pytest.raises(ValueError, match=message):
        HopeCache.load(tmp_path / "c.safetensors", model.config)


# --- both cache names; no deprecation warnings from our own calls -------------------------------------
def test_both_cache_names_are_accepted():
    model = tiny_model(seed=18)
    x, follow = ids(seed=19), ids(seed=20, length=3)
    with torch.no_grad():
        a = output_cache(model(x, use_cache=True))
        b = copy.deepcopy(a)
        assert torch.equal(model(follow, cache=a).logits, model(follow, past_key_values=b).logits)
        with pytest.raises(ValueError, match="not both"):
            model(follow, cache=a, past_key_values=b)
        out = model.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        assert isinstance(out[CACHE_NAME], HopeCache)


def test_no_cache_deprecation_warnings_from_our_calls(monkeypatch):
    import transformers.utils.generic as generic

    logged = []
    if hasattr(generic, "logger"):
        monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: logged.append(msg), raising=False)
    model = tiny_model(seed=21)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    adapted = apply_hope_adapter(llama, HopeAdapterConfig(layers=[1], cms_chunk_sizes=[2], chunk_size=2,
                                                          memory_chunk_size=4))
    x = ids(seed=22, length=6)
    kw = dict(max_new_tokens=4, pad_token_id=0, return_dict_in_generate=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in (model, adapted):
            with torch.no_grad():
                cache = output_cache(m(x, use_cache=True))
                m(x[:, :2], cache=cache)
            out = m.generate(x, do_sample=False, **kw)
            m.generate(torch.cat([out.sequences, x[:, :2]], 1), cache=output_cache(out), do_sample=False, **kw)
            m.generate(x, do_sample=False, num_beams=2, **kw)
            m.generate(x, do_sample=True, **kw)
    cache_warnings = [str(w.message) for w in caught if "past_key_values" in str(w.message) or
                      "cache_params" in str(w.message)]
    cache_warnings += [m for m in logged if "past_key_values" in m]
    assert not cache_warnings, cache_warnings


def test_retention_that_underflows_to_zero_keeps_gradients_finite():
    """A rate readout trained far negative makes alpha = sigmoid(logit) exactly 0 in float32; log(0) clamped
    to a finite value has the backward 0 / 0 = NaN (issue 12: a whole MQAR training step's gradient was NaN)."""
    from hope_hf.models.hope.chunk_grid import LOG_ALPHA_MIN, masked_rates

    torch.manual_seed(11)
    logits = torch.randn(3, 2, 7, dtype=torch.float64) * 4
    logits[0, 1, 2] = logits[2, 0, 5] = -800.0  # sigmoid underflows to exactly 0 in float64 too
    logits.requires_grad_(True)
    alpha = torch.sigmoid(logits)
    assert (alpha == 0).sum() == 2
    eta = torch.rand(3, 2, 7, dtype=torch.float64)
    _, log_alpha = masked_rates(eta, alpha, None)
    assert torch.equal(log_alpha.detach(), alpha.detach().log().clamp(min=LOG_ALPHA_MIN))
    weights = torch.randn_like(log_alpha)
    (grad,) = torch.autograd.grad((log_alpha * weights).sum(), logits)
    assert torch.isfinite(grad).all()
    saturated = alpha.detach() == 0
    expected = weights * torch.sigmoid(-logits.detach())  # d logsigmoid(x) / dx = sigmoid(-x)
    torch.testing.assert_close(grad[~saturated], expected[~saturated])
    assert (grad[saturated] == 0).all()


@pytest.mark.parametrize("mixer", ["self_modifying", "titans"])
@pytest.mark.parametrize("memory", MEMORY_TYPES)
def test_model_with_a_zero_retention_head_trains_with_finite_gradients(mixer, memory):
    model = tiny_model(seed=3, mixer=mixer, memory_type=memory).train()
    for layer in model.model.layers:
        bias = layer.mixer.alpha_bias if mixer == "self_modifying" else layer.mixer.alpha_proj.bias
        with torch.no_grad():
            bias[0] = -300.0  # head 0 forgets everything at every token: alpha = 0 exactly
    batch = ids(seed=5, length=23)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    bad = [name for name, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad
