"""In-context associative recall: HOPE with in-context updates vs the same model without.

Random key->value pairs, then queries of the keys; the loss and accuracy are measured only at
the answers. A model that cannot write its memory in context can only guess (~1/num_values).

    python scripts/associative_recall.py --steps 200 --out runs/associative_recall
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tqdm.auto import tqdm

from hope_hf import HopeConfig, HopeForCausalLM
from hope_hf.data.synthetic import make_associative_recall


def build(in_context_updates: bool, args) -> HopeForCausalLM:
    torch.manual_seed(args.seed)
    config = HopeConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=2, num_heads=args.num_heads,
        mixer=args.mixer, memory_type=args.memory_type, chunk_size=args.chunk_size,
        memory_chunk_size=args.chunk_size, cms_chunk_sizes=[None], eta_init=0.3,
        in_context_updates=in_context_updates,
    )
    return HopeForCausalLM(config)


def accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(data["input_ids"], use_cache=False).logits[:, :-1]
    labels = data["labels"][:, 1:]
    keep = labels != -100
    return (logits.argmax(-1)[keep] == labels[keep]).float().mean().item()


def train(in_context_updates: bool, args, train_data, test_data) -> dict:
    model = build(in_context_updates, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    n = train_data["input_ids"].shape[0]
    losses, start = [], time.time()
    for _ in tqdm(range(args.steps), desc=f"updates={'on' if in_context_updates else 'off'}"):
        model.train()
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        loss = model(train_data["input_ids"][idx], labels=train_data["labels"][idx]).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return {"in_context_updates": in_context_updates, "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "test_accuracy": accuracy(model, test_data), "seconds": time.time() - start}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=64)
    parser.add_argument("--num-kv-pairs", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=2)
    parser.add_argument("--mixer", default="self_modifying")
    parser.add_argument("--memory-type", default="deep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    train_data = make_associative_recall(4096, vocab_size=args.vocab_size, num_kv_pairs=args.num_kv_pairs, seed=args.seed).tensors
    test_data = make_associative_recall(512, vocab_size=args.vocab_size, num_kv_pairs=args.num_kv_pairs, seed=args.seed + 1).tensors
    results = [train(True, args, train_data, test_data), train(False, args, train_data, test_data)]
    print(f"{'in-context updates':<20}{'train loss':>12}{'test acc':>10}{'seconds':>9}")
    for r in results:
        print(f"{'on' if r['in_context_updates'] else 'off':<20}{r['final_train_loss']:>12.3f}"
              f"{r['test_accuracy']:>10.3f}{r['seconds']:>9.1f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
