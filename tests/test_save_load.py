"""save_pretrained / from_pretrained, Auto classes, remote code, and keeping a cache."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from _scripts import run_without_hope_hf
from conftest import tiny_config, tiny_model
from hope_hf import HopeCache, HopeConfig, HopeForCausalLM
from hope_hf.models.hope.hf_compat import output_cache


def ids(seed=0, length=12, batch=2):
    return torch.randint(3, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_roundtrip_identical_logits_and_tied_weights(tmp_path):
    model = tiny_model(seed=1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HopeForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HopeConfig)


def test_remote_code_loads_without_hope_hf(tmp_path):
    model = tiny_model(seed=2)
    HopeConfig.register_for_auto_class()
    HopeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    try:
        model.save_pretrained(tmp_path)
    finally:
        HopeConfig._auto_class = None
        HopeForCausalLM._auto_class = None
    x = ids(seed=3)
    with torch.no_grad():
        expected = model(x).logits
    torch.save({"x": x, "expected": expected}, tmp_path / "probe.pt")
    result = run_without_hope_hf(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        probe = torch.load({str(tmp_path / "probe.pt")!r})
        with torch.no_grad():
            out = model(probe["x"]).logits
        assert torch.equal(out, probe["expected"]), (out - probe["expected"]).abs().max()
        assert "hope_hf" not in sys.modules
        print("REMOTE_OK", type(model).__module__)
    """, tmp_path)
    assert "REMOTE_OK" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "modeling_hope.py").exists() and all((tmp_path / f).exists() for f in ("configuration_hope.py", "dgd_naive.py", "dgd_chunk.py", "dgd_fla.py", "cms_naive.py", "cms_chunk.py", "primitives.py", "chunk_grid.py", "cache_hope.py", "hf_compat.py"))


def test_failed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model = tiny_model(seed=3)
    target = tmp_path / "ckpt"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    import transformers.modeling_utils as mu
    monkeypatch.setattr(mu, "safe_save_file", broken, raising=False)
    with pytest.raises(OSError):
        model.save_pretrained(target)
    assert not target.exists() or not any(target.iterdir())


def test_unwritable_folder(tmp_path):
    model = tiny_model(seed=3)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        model.save_pretrained(blocker / "ckpt")


def test_cache_save_load_continues_exactly(tmp_path):
    model = tiny_model(seed=4, dtype=torch.float64)
    document = ids(seed=5, length=20, batch=1)
    question = ids(seed=6, length=7, batch=1)
    with torch.no_grad():
        whole = model(torch.cat([document, question], 1)).logits[:, 20:]
        cache = output_cache(model(document, use_cache=True))
    cache.save(tmp_path / "memory.safetensors")
    model.save_pretrained(tmp_path / "model")
    del model, cache  # "restart": only the two folders survive
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float64).eval()
    cache = HopeCache.load(tmp_path / "memory.safetensors", model.config)
    with torch.no_grad():
        continued = model(question, cache=cache).logits
    torch.testing.assert_close(continued, whole, atol=1e-12, rtol=0)


def test_cache_refused_for_other_config(tmp_path):
    model = tiny_model(seed=4)
    with torch.no_grad():
        cache = output_cache(model(ids(), use_cache=True))
    cache.save(tmp_path / "m.safetensors")
    other = tiny_config(memory_type="linear")
    with pytest.raises(ValueError, match="memory_type"):
        HopeCache.load(tmp_path / "m.safetensors", other)
    with pytest.raises(ValueError, match="another model config"):
        tiny_model(seed=0, memory_type="linear")(ids(), cache=cache)
    with pytest.raises(ValueError, match="batch size"):
        model(ids(batch=3), cache=cache)


def test_cache_batch_operations_are_per_sample():
    model = tiny_model(seed=9, dtype=torch.float64)
    x = ids(seed=10, length=11, batch=3)
    follow = ids(seed=11, length=4, batch=3)
    with torch.no_grad():
        cache = output_cache(model(x, use_cache=True))
        expected = model(follow, cache=cache).logits
        # select samples 2 and 0 from a fresh cache: each continues as it would in the full batch
        cache = output_cache(model(x, use_cache=True))
        cache.batch_select_indices(torch.tensor([2, 0]))
        assert cache.batch_size == 2
        got = model(follow[[2, 0]], cache=cache).logits
        torch.testing.assert_close(got, expected[[2, 0]], atol=1e-12, rtol=0)
        # repeat_interleave then reorder: sample order follows the index
        cache = output_cache(model(x[:1], use_cache=True))
        cache.batch_repeat_interleave(2)
        cache.reorder_cache(torch.tensor([1, 0]))
        got = model(follow[[0, 0]], cache=cache).logits
        torch.testing.assert_close(got, expected[[0, 0]], atol=1e-12, rtol=0)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.batch_size == -1 and not cache.layers[0].state
