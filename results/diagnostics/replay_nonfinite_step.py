"""Replay the first training step whose gradient was not finite, saved by `scripts/synthetic.py mqar ...
--dump-nonfinite` (`train_model(nonfinite_dump=...)`: the weights the step was computed at and its batch).

    python results/diagnostics/replay_nonfinite_step.py runs/x/nonfinite_HOPE_lr0.003_seed0.pt \
        --kv-pairs 16 --compile_chunks          # the run's own model flags (the HOPE config)

Runs the step's forward and backward twice: plainly (loss, how many parameters get a non-finite gradient) and
under `torch.autograd.detect_anomaly`, which names the first op whose backward returns NaN and where its forward
was called.

Issue 12 (MQAR 16, seed 0, lr 3e-3, step 800; `results/in_context/README.md` section 13): loss 3.933, 47
parameters with NaN gradients; the anomaly is `LogBackward0` in `chunk_grid.masked_rates`: a retention
alpha = sigmoid(logit) had underflowed to exactly 0, log(0) = -inf was clamped to a finite value, and its
backward is 0 / 0. After the fix (the log of a safe stand-in) the same step has no non-finite gradient.
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from hope_hf.data.synthetic import FILLER_ID  # noqa: E402
from hope_hf.experiments import hope_and_llama  # noqa: E402
import synthetic  # noqa: E402  (scripts/synthetic.py: the suite's parser and config)


def backward(model, batch, anomaly: bool) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autograd.detect_anomaly(check_nan=True) if anomaly else torch.enable_grad():
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     use_cache=False).loss
        loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    print(f"loss {loss.item():.4f}; parameters with a non-finite gradient: {len(bad)} {bad[:6]}", flush=True)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    dump = torch.load(sys.argv[1])
    args = synthetic.build_parser().parse_args(["mqar", "--models", "HOPE", *sys.argv[2:]])
    config = synthetic.hope_config(args, args.mqar_vocab, FILLER_ID)
    model = hope_and_llama(config, args.mqar_seq_len, seed=0)["HOPE"]
    model.load_state_dict(dump["state_dict"])
    model.train()
    print(f"step {dump['step']}, batch {tuple(dump['batch']['input_ids'].shape)}", flush=True)
    backward(model, dump["batch"], anomaly=False)
    try:
        backward(model, dump["batch"], anomaly=True)
        print("no anomaly")
    except RuntimeError as error:  # detect_anomaly raises at the first NaN-returning backward op
        print(f"anomaly: {error}")


if __name__ == "__main__":
    main()
