"""`scripts/bench_chunk_sizes.py` runs end to end on a tiny model and writes its table."""
import json

from _scripts import load_script


def test_bench_chunk_sizes_times_each_chunk_size_against_llama(tmp_path):
    bench = load_script("bench_chunk_sizes")
    result = bench.main(["--chunk-sizes", "4", "8", "--length", "24", "--rounds", "1", "--size",
                         "d=16,layers=1,heads=2,vocab=64", "--out", str(tmp_path)])
    assert list(result["rows"]) == ["llama", "hope chunk_size 4", "hope chunk_size 8"]
    assert all(row["tokens_per_s"] > 0 and len(row["seconds"]) == 1 for row in result["rows"].values())
    saved = json.loads((tmp_path / "bench_chunk_sizes.json").read_text())
    assert saved["rows"].keys() == result["rows"].keys() and saved["length"] == 24


def test_bench_speed_only_decode_times_decode_cells_against_llama(tmp_path):
    bench = load_script("bench_speed")
    record = bench.main(["--only-decode", "--rows", "hope", "--contexts", "8", "--size", "d=16,layers=1,heads=2,vocab=64",
                         "--repeats", "1", "--decode-steps", "2", "--out", str(tmp_path)])
    assert record["rows"] == ["llama", "hope"] and record["recurrence"] is None
    for row in record["rows"]:
        cells = record["results"][row]
        assert list(cells) == ["decode:8"] and "error" not in cells["decode:8"], cells
        assert cells["decode:8"]["ms_per_token"]
    assert (tmp_path / "bench_speed.json").exists()
