"""scripts/profile_hope.py on a tiny model: counts, shares and the written files."""

import json

from _scripts import load_script


def test_profile_counts_ops_per_chunk_and_matmul_share(tmp_path):
    profile = load_script("profile_hope")
    cells = profile.main(["--rows", "llama,hope", "--tasks", "train:96:fp32,decode:16", "--size",
                          "d=16,layers=1,heads=2,vocab=64", "--out", str(tmp_path), "--top", "5"])
    by = {(c["row"], c["task"]): c for c in cells}
    hope_train = by[("hope", "train:96:fp32")]  # chunk_size 64: one whole chunk and a partial one
    assert hope_train["chunks"] == 2 and hope_train["calls_per_chunk"] == hope_train["top_level_calls"] / 2
    # HOPE's memories and CMS levels run many more small ops than a same-size Llama.
    assert hope_train["top_level_calls"] > 5 * by[("llama", "train:96:fp32")]["top_level_calls"]
    for cell in cells:
        assert 0.0 < cell["matmul_share"] < 1.0 and cell["self_ms"] > 0
        assert abs(sum(o["self_ms"] for o in cell["ops"]) - cell["self_ms"]) < 1e-6
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert len(saved["cells"]) == 4 and "| hope | train:96:fp32 |" in (tmp_path / "profile.md").read_text()
