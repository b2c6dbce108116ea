"""Checkpoints and a cache file saved by hope-hf 0.1.0 (tests/fixtures/checkpoints_v0.1.0, float64)
load and give the logits they gave when they were saved: changes to the code, the defaults or the
layout must not change what an existing checkpoint computes."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hope_hf import HopeCache

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_v0.1.0"
PROBES = load_file(str(FIXTURES / "probes.safetensors"))


@pytest.mark.parametrize("name", ["self_modifying-deep", "titans-linear", "attention-deep"])
def test_saved_checkpoint_gives_its_saved_logits(name):
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(PROBES["input_ids"]).logits
    torch.testing.assert_close(logits, PROBES[f"{name}.logits"], rtol=0, atol=1e-12)


def test_saved_cache_continues_as_it_did():
    name = "self_modifying-deep"
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float64).eval()
    cache = HopeCache.load(FIXTURES / name / "cache.safetensors", model.config)
    with torch.no_grad():
        logits = model(PROBES["follow_ids"], cache=cache).logits
    torch.testing.assert_close(logits, PROBES[f"{name}.follow_logits"], rtol=0, atol=1e-12)


def test_saved_llama_adapter_gives_its_saved_logits():
    from transformers import LlamaForCausalLM

    from hope_hf.adapters import load_hope_adapter

    folder = FIXTURES / "adapter"
    probes = load_file(str(folder / "probes.safetensors"))
    base = LlamaForCausalLM.from_pretrained(folder / "base", dtype=torch.float64)
    model = load_hope_adapter(base, folder / "hope_adapter").eval()
    with torch.no_grad():
        logits = model(probes["input_ids"]).logits
    torch.testing.assert_close(logits, probes["logits"], rtol=0, atol=1e-12)


def test_legacy_defaults_apply_only_to_configs_saved_without_the_field(tmp_path):
    from hope_hf import HopeConfig
    from hope_hf.models.hope.configuration_hope import LEGACY_DEFAULTS

    old = HopeConfig.from_pretrained(FIXTURES / "self_modifying-deep")  # saved by 0.1.0: no memory_read
    assert old.memory_read == LEGACY_DEFAULTS["memory_read"]
    assert old.dgd_step_bound is False and old.eta_max == LEGACY_DEFAULTS["eta_max"]  # 0.1.0 had no step bound
    new = HopeConfig(vocab_size=61, hidden_size=16, num_heads=2, num_hidden_layers=1)
    assert new.memory_read != LEGACY_DEFAULTS["memory_read"]  # today's default
    new.save_pretrained(tmp_path)
    assert HopeConfig.from_pretrained(tmp_path).to_dict() == new.to_dict()  # saved explicitly, kept
    # chunk_size's default moved from 16 to 64 (docs/design.md §8.21): a config without it computes as before
    assert new.chunk_size == 64
    assert HopeConfig.from_dict({"vocab_size": 61}).chunk_size == LEGACY_DEFAULTS["chunk_size"] == 16
