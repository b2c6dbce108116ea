"""Where does HOPE lose on a^n b^n? Accuracy split by the kind of example (issue 12: the default HOPE stays at
0.85 on the training lengths at every learning rate, the Llama reaches 1.00).

    OMP_NUM_THREADS=1 python results/diagnostics/anbn_errors_by_kind.py [--seed 0] [--lr-hope 3e-3] [--lr-llama 1e-3] \
        [--models HOPE Llama] [HopeConfig flags of scripts/synthetic.py, e.g. --eta_init 0.01]

Trains the suite's HOPE (defaults) and Llama exactly as `scripts/synthetic.py formal --languages anbn` does
(same data, same seeded batches, 300 steps), then scores held-out strings of the training lengths (1-40) and
longer ones (41-80) by kind:
- member: a^n b^n;
- count: a^i b^j with i != j (only the counts are wrong: telling it apart needs counting);
- order: any other non-member (a b after an a-b boundary, a c-free shuffle, ...: a local pattern gives it away).
"""
import argparse
import functools
import json
import re
from dataclasses import replace
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from hope_hf.data.synthetic import (FORMAL_LANGUAGES, FORMAL_VOCAB, PAD_ID, FormalLanguageDataset,  # noqa: E402
                                    formal_language_accuracy, formal_language_collate)
from hope_hf.experiments import evaluate_accuracy, hope_and_llama, train_model  # noqa: E402
import synthetic  # noqa: E402  (scripts/synthetic.py: the suite's parser, config and budget)

SORTED = re.compile(r"^(a*)(b*)$")


def kind(string: str, label: int) -> str:
    if label:
        return "member"
    return "count" if SORTED.match(string) else "order"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-hope", type=float, default=3e-3)
    parser.add_argument("--lr-llama", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--models", nargs="+", default=["HOPE", "Llama"], choices=["HOPE", "Llama"])
    parser.add_argument("--out", default=None, help="JSON file for the table")
    args, config_flags = parser.parse_known_args()

    # anything else is a HopeConfig flag of the suite (`--eta_init 0.01`, ...); the suite's parser rejects the rest
    suite = synthetic.build_parser().parse_args(["formal", "--languages", "anbn", *config_flags])
    config = synthetic.hope_config(suite, len(FORMAL_VOCAB), PAD_ID)
    data_seed = args.seed + 1000 * list(FORMAL_LANGUAGES).index("anbn")  # as run_formal seeds it
    train = FormalLanguageDataset.generate("anbn", suite.num_train, 1, 40, seed=data_seed)
    tests = {"train lengths": FormalLanguageDataset.generate("anbn", suite.num_test, 1, 40, seed=data_seed + 1),
             "longer": FormalLanguageDataset.generate("anbn", suite.num_test, 41, 80, seed=data_seed + 2)}
    score = functools.partial(evaluate_accuracy, collate=formal_language_collate, accuracy=formal_language_accuracy,
                              per="example")
    base = synthetic.budget_for("formal", suite)
    table = {}
    for name, model in hope_and_llama(config, 83, seed=args.seed).items():
        if name not in args.models:
            continue
        lr = args.lr_hope if name == "HOPE" else args.lr_llama
        budget = replace(base, lr=lr, seed=args.seed, steps=args.steps)
        train_model(model, train, formal_language_collate, budget, desc=f"{name} lr={lr}")
        for split, data in tests.items():
            groups: dict[str, list[int]] = {}
            for i, example in enumerate(data.examples):
                groups.setdefault(kind(example.string, example.label), []).append(i)
            row = {"all": round(score(model, data), 3)}
            for group, indices in sorted(groups.items()):
                subset = FormalLanguageDataset([data.examples[i] for i in indices])
                row[f"{group} ({len(indices)})"] = round(score(model, subset), 3)
            table[f"{name} lr {lr}, {split}"] = row
            print(f"{name} lr {lr}, {split}: {row}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "config_flags": config_flags, "accuracy": table}, indent=2))


if __name__ == "__main__":
    main()
