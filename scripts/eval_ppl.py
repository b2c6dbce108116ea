#!/usr/bin/env python
"""Perplexity on held-out text, and loss against token position over long documents.

1. Perplexity of each `--model` on held-out text: `--text_files`, or by default the last 2% of the
   Shakespeare corpus (the quickstart's validation split), cut into `--block_size` blocks.
2. Loss against token position: each of `--num_documents` Paul Graham essays (the longest ones) is read
   in one pass of up to `--max_length` tokens; the per-token losses are averaged per position and in
   log-spaced position bins. Does the memory help later positions? A model whose loss keeps falling with
   position is using the context; a Transformer past its training length usually gets worse.

Writes `eval_results.json`, `loss_by_position.csv` and `loss_by_position.png` into `--out`::

    python scripts/eval_ppl.py --model runs/quickstart runs/quickstart/baseline-llama --out runs/eval

Any causal LM folder with its tokenizer works (HOPE, or a Llama baseline); each model uses its own
tokenizer. HOPE streams the documents through its cache in `--piece` token pieces (exactly equal to one
pass, see the README's streaming contract), so memory stays flat at any length.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from hope_hf.experiments import plot_lines, write_table  # noqa: E402
from hope_hf.training import (  # noqa: E402
    check_vocab,
    evaluate_loss,
    load_causal_lm,
    load_corpus,
    loss_by_position,
    perplexity,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True, help="saved model folders (with their tokenizer)")
    parser.add_argument("--out", default="runs/eval")
    parser.add_argument("--text_files", nargs="+", default=None,
                        help="held-out text files/folders (default: the last 2%% of Shakespeare)")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--max_blocks", type=int, default=128)
    parser.add_argument("--num_documents", type=int, default=16, help="long essays for loss vs position")
    parser.add_argument("--max_length", type=int, default=2048, help="tokens read per essay")
    parser.add_argument("--piece", type=int, default=512, help="HOPE: tokens per cached forward call")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from hope_hf.data import load_paul_graham_essays, load_shakespeare_text, split_text, tokenize_and_chunk

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        held_out = (load_corpus(args.text_files, "text_files") if args.text_files
                    else split_text(load_shakespeare_text(), val_fraction=0.02)[1])
        models = {}
        for path in args.model:
            model = load_causal_lm(path, require_hope=False, argument="model").eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
            check_vocab(model.config, tokenizer)
            models[path] = (model, tokenizer)
    except (FileNotFoundError, ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    essays = sorted(load_paul_graham_essays(), key=len, reverse=True)[:args.num_documents]

    rows, curves, summary = [], {}, {}
    for path, (model, tokenizer) in models.items():
        label = f"{model.config.model_type} ({Path(path).name})"
        blocks = tokenize_and_chunk(held_out, tokenizer, args.block_size, max_blocks=args.max_blocks)
        loss = evaluate_loss(model, blocks, bf16=args.bf16)
        print(f"{label}: held-out loss {loss:.4f}, perplexity {perplexity(loss):.2f} "
              f"({len(blocks)} blocks of {args.block_size} tokens)")
        documents = [torch.as_tensor(tokenizer(essay, add_special_tokens=False)["input_ids"]) for essay in essays]
        positions = loss_by_position(model, documents, args.max_length, args.piece, bf16=args.bf16,
                                     progress=f"{label}: essays")
        counts, bad, first_bad = positions.counts, positions.non_finite, positions.first_non_finite
        binned = positions.binned()
        for a, b, value in binned:
            rows.append({"model": label, "path": path, "positions": f"{a}-{b}", "position_start": a,
                         "position_end": b, "mean_loss": round(value, 4),
                         "tokens": int(counts[a - 1:b].sum()), "non_finite_tokens": int(bad[a - 1:b].sum())})
        if first_bad:
            print(f"  {label}: non-finite losses in {len(first_bad)}/{len(essays)} essays, first at position "
                  f"{min(first_bad)}")
            label += f", non-finite from position {min(first_bad)} in {len(first_bad)}/{len(essays)} essays"
        curves[label] = ([math.sqrt(a * b) for a, b, _ in binned], [value for _, _, value in binned])
        summary[path] = {"label": label, "held_out_loss": loss, "held_out_perplexity": perplexity(loss),
                         "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
                         "documents": len(essays), "first_non_finite_position": min(first_bad, default=None),
                         "documents_with_non_finite_loss": len(first_bad),
                         "loss_by_position": (positions.totals / counts.clamp(min=1))[:positions.length - 1].tolist()}
        print("  loss by position: " + ", ".join(f"{r['positions']}: {r['mean_loss']:.3f}"
                                                  for r in rows if r["path"] == path))
    out = Path(args.out)
    write_table(out, "loss_by_position", rows, meta={"models": summary, "args": vars(args)})
    (out / "loss_by_position.json").rename(out / "eval_results.json")
    plot_lines(out / "loss_by_position.png", curves, xlabel="token position (log-spaced bins)",
               ylabel="mean next-token loss", logx=True,
               title=f"Loss vs position on {len(essays)} Paul Graham essays (up to {args.max_length} tokens)")
    print(f"wrote {out / 'eval_results.json'}, {out / 'loss_by_position.csv'}, {out / 'loss_by_position.png'}")
    return {"models": summary, "rows": rows}


if __name__ == "__main__":
    main()
