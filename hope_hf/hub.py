"""Checkpoints for the Hub: model + tokenizer + model card, loadable with `trust_remote_code=True`.

* `render_model_card`: fills `model_cards/README_TEMPLATE.md` (config table, training data, metrics).
* `save_checkpoint`: writes model, tokenizer and card into one folder, all or nothing, with the
  modelling code copied beside the weights (`register_for_auto_class`), so the folder loads with
  `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` where hope_hf is not installed.
* `push_to_hub`: `save_checkpoint` into a temporary folder, then one commit with every file.

`model.push_to_hub(repo_id)` (transformers' own) works too once `remote_code_registration()` is on, but
it replaces the card by the Hub's default one and sends no tokenizer; `push_to_hub` here sends both.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

from torch import nn
from transformers import PreTrainedTokenizerBase

from .models.hope.configuration_hope import HopeConfig
from .models.hope.modeling_hope import HopeForCausalLM, HopeModel, staged_folder

__all__ = ["MODEL_CARD_TEMPLATE", "push_to_hub", "remote_code_registration", "render_model_card", "save_checkpoint"]

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "README_TEMPLATE.md"


def _markdown_table(header: tuple[str, str], rows: Mapping[str, Any]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{key}` | {value} |" for key, value in rows.items()]
    return "\n".join(lines)


def _format_metric(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_model_card(
    model: nn.Module,
    *,
    model_name: str,
    repo_id: Optional[str] = None,
    training_data: str = "Not recorded.",
    metrics: Optional[Mapping[str, Any]] = None,
    template: str | Path = MODEL_CARD_TEMPLATE,
) -> str:
    """The model card (markdown with YAML front matter) of a HOPE `model`.

    The config table lists every knob of `HopeConfig.__init__` with the model's value.

    Raises:
        FileNotFoundError: the template file is missing (it lives in the repository's `model_cards/`).
    """
    template = Path(template)
    if not template.is_file():
        raise FileNotFoundError(f"template: the model card template {str(template)!r} does not exist")
    config = model.config
    knobs = [name for name in inspect.signature(type(config).__init__).parameters
             if name not in ("self", "kwargs") and hasattr(config, name)]
    table = _markdown_table(("field", "value"), {name: f"`{getattr(config, name)!r}`" for name in knobs})
    metric_table = (_markdown_table(("metric", "value"), {k: _format_metric(v) for k, v in metrics.items()})
                    if metrics else "Not evaluated.")
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return template.read_text().format(
        model_name=model_name, repo_id=repo_id or f"<your-name>/{model_name}", config_table=table,
        training_data=training_data, metrics=metric_table, parameters=parameters,
    )


@contextlib.contextmanager
def remote_code_registration() -> Iterator[None]:
    """While active, `save_pretrained` of HOPE models copies the modelling code into the checkpoint and
    writes `auto_map` (transformers' `register_for_auto_class`); the previous registration is restored
    afterwards, so other saves are not affected."""
    previous = (HopeConfig._auto_class, HopeModel._auto_class, HopeForCausalLM._auto_class)
    HopeConfig.register_for_auto_class()
    HopeModel.register_for_auto_class("AutoModel")
    HopeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    try:
        yield
    finally:
        HopeConfig._auto_class, HopeModel._auto_class, HopeForCausalLM._auto_class = previous


def save_checkpoint(
    model: nn.Module,
    tokenizer: Optional[PreTrainedTokenizerBase],
    save_directory: str | os.PathLike,
    *,
    remote_code: bool = True,
    card: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Save `model`, `tokenizer` and a model card into `save_directory`, all or nothing.

    Everything is written into a temporary sibling folder first; files are moved in only when all
    writes succeeded (`staged_folder`; other files already in the folder, e.g. Trainer `checkpoint-*`
    folders, stay).

    Args:
        model: a HOPE model (`HopeForCausalLM`; a `PreTrainedModel` in general).
        tokenizer: saved beside the model (`None`: no tokenizer).
        save_directory: the target folder (created if needed).
        remote_code: copy the modelling code and write `auto_map` (loads with `trust_remote_code=True`).
        card: keyword arguments of `render_model_card` (`model_name`, `repo_id`, `training_data`,
            `metrics`); `None` writes no card.

    Returns:
        The folder.
    """
    target = Path(save_directory).resolve()
    if target.is_file():
        raise OSError(f"save_directory: {str(target)!r} is a file, not a folder")
    with staged_folder(target) as staging:
        with remote_code_registration() if remote_code else contextlib.nullcontext():
            model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if card is not None:
            (Path(staging) / "README.md").write_text(render_model_card(model, **card))
    return target


def push_to_hub(
    model: nn.Module,
    tokenizer: Optional[PreTrainedTokenizerBase],
    repo_id: str,
    *,
    card: Optional[Mapping[str, Any]] = None,
    private: Optional[bool] = None,
    token: Optional[str | bool] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    commit_message: str = "Upload HOPE model, tokenizer and model card",
):
    """Create `repo_id` if needed and upload model (with its code), tokenizer and card in one commit.

    Uses transformers' shared `HfApi` (`transformers.utils.hub.hf_api()`), like `model.push_to_hub`.

    Returns:
        The `CommitInfo` of the upload.
    """
    from transformers.utils import hub as transformers_hub

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty 'name' or 'owner/name' string, got {repo_id!r}")
    api = transformers_hub.hf_api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card = dict(card or {})
    card.setdefault("model_name", repo_id.split("/")[-1])
    card["repo_id"] = repo_id
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(model, tokenizer, folder, remote_code=True, card=card)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, token=token,
                                 revision=revision, create_pr=create_pr)
