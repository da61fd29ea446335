"""`make bench` works: a tiny run writes well-formed results for TorchServe and the KServe predictor
side by side (speed itself is not a test)."""
import json
import math

import pytest

from scripts.bench import main as bench_main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tiny_benchmark_writes_well_formed_results(model_root, release_model_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert bench_main(["--tiny", "--model-root", str(model_root), "--model-dir", str(release_model_dir),
                       "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("raw_images_per_s", "raw_decode_images_per_s", "raw_onnx_images_per_s", "raw_onnx_decode_images_per_s",
                "served_images_per_s", "naive_images_per_s", "served_over_raw", "served_over_raw_decode",
                "served_over_naive", "served_over_raw_onnx", "raw_int8_images_per_s", "raw_int8_decode_images_per_s",
                "served_over_raw_int8"):
        assert isinstance(r[key], (int, float)) and r[key] > 0 and math.isfinite(r[key]), key
    for key, s in r["spread"].items():  # every figure repeated: the median of its runs, inside min..max
        assert len(s["runs"]) == r["runs"] >= 3 and s["min"] <= s["median"] <= s["max"], key
        assert r.get(key, s["median"]) == s["median"], key
    assert r["wire"]["json_bytes_over_raw"] > 1.3  # base64 alone adds a third
    assert r["wire"]["json_parse_us_per_photo"]["median"] > 0
    assert r["phone_photo"]["photo"] == "4032x3024 JPEG"
    assert r["phone_photo"]["served_ms"]["median"] > 0 and r["phone_photo"]["full_decode_ms"]["median"] > 0
    assert r["environment"]["naive_warmup_requests"] == 50
    assert len(r["worker_rss_mb_over_time"]) == 3 and len(r["load_average"]["end"]) == 3
    assert r["environment"]["cpu_backend"] == "onnx-int8" and "avx2" in r["environment"]["cpu_isa"]
    # what the archive's backend serves on this CPU, named, and served measured against that path's own raw figure
    assert r["served_rule"] == r["raw_paths"]["onnx-int8"] and r["served_rule"]["rule"] in ("int8", "float")
    assert (r["served_rule"]["rule"] == "int8") == (r["served_rule"]["fallback"] is None)
    assert r["raw_paths"]["eager"] == {"backend": "eager", "rule": "float", "runtime": "torch", "fallback": None}
    assert r["served_over_raw_served_path_decode"] == pytest.approx(
        r["served_images_per_s"] / r["raw_int8_decode_images_per_s"], rel=0.01)
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert r["served_over_raw"] == pytest.approx(r["served_images_per_s"] / r["raw_images_per_s"], rel=0.01)
    for conc in ("concurrency_1", "concurrency_8"):
        lat = r["latency_ms"][conc]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert all(v > 0 for v in r["peak_rss_mb"].values())
    assert r["environment"]["cpus"] >= 1 and r["environment"]["torchserve"] == "0.12.0"
    k = r["predictor"]  # returns-kserve on the same archive, in the same run
    assert k["api"] == "v2"
    for key in ("served_images_per_s", "naive_images_per_s", "served_over_raw", "served_over_naive",
                "served_over_torchserve", "peak_rss_mb"):
        assert isinstance(k[key], (int, float)) and k[key] > 0 and math.isfinite(k[key]), key
    assert k["served_over_torchserve"] == pytest.approx(k["served_images_per_s"] / r["served_images_per_s"], rel=0.02)
    for conc in ("concurrency_1", "concurrency_8"):
        assert 0 < k["latency_ms"][conc]["p50"] <= k["latency_ms"][conc]["p99"]
    assert r["environment"]["kserve"] == "0.21.0" and r["environment"]["openvino"] == "2026.4.1"
    out = capsys.readouterr().out
    assert "served: returns-submit" in out and "returns-submit -> returns-kserve" in out and "served rule" in out


def test_gpu_bench_says_plainly_when_there_is_no_gpu(release_model_dir, tmp_path, monkeypatch):
    import torch
    from scripts.bench_gpu import main as gpu_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA sees no GPU here"):
        gpu_main(["--model-dir", str(release_model_dir), "--output", str(tmp_path / "gpu.json")])
    assert not (tmp_path / "gpu.json").exists()
