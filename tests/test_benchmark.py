"""Smoke test of bench/benchmark.py: every section's function runs at a tiny size and its report is written.

No timing assertions (speed is checked by running the script, see docs/benchmarks.md); the test only keeps the
script from rotting and checks the correctness facts it reports (outputs agree, identical label maps).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import benchmark  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def results() -> dict:
    threads = torch.get_num_threads()  # as the test session set it
    return {
        "command": "python bench/benchmark.py (test)",
        "machine": benchmark.machine_info(CPU, threads),
        "encoder": benchmark.bench_encoder_sizes([64], [1, 2], 1, CPU),
        "training": benchmark.bench_training(64, 1, 1, CPU, threads, rounds=1),  # two fresh subprocesses
        "prediction": benchmark.bench_prediction(input_size=64, num_tiles=2, batch_size=1, num_workers=1,
                                                 device=CPU, tile=64),
        "per_tile": benchmark.bench_per_tile(1, size=128, nuclei=20),
    }


def test_sections_measure_and_check(results):
    enc = results["encoder"]
    assert enc["outputs_agree"] and enc["rows"][0]["rel_l2_optimised_vs_plain_lora"] < 1e-4
    row = enc["rows"][0]
    assert set(row["batch1"]) == {"plain", "plain+LoRA", "optimised"} and set(row["per_batch"]) == {1, 2}
    assert row["best_batch_optimised"]["batch"] in (1, 2) and row["speedup_batch1"] > 0

    lora_case, full_case = results["training"]["cases"]["lora"], results["training"]["cases"]["full"]
    assert lora_case["trainable_parameters"] < full_case["trainable_parameters"] == full_case["total_parameters"]
    assert lora_case["peak_memory_mib"] >= 0 and lora_case["step_s"]["median"] > 0

    pred = results["prediction"]
    assert pred["identical_labels"] and pred["sequential"]["nuclei_per_tile"] > 0
    assert pred["overlapped"]["num_workers"] == 1 and pred["sequential"]["tiles_per_s"] > 0

    per_tile = results["per_tile"]
    assert per_tile["nuclei"] == 20 and per_tile["found_by_postprocess"] > 10 and per_tile["metrics_ms"] > 0


def test_reports_keep_the_other_device(results, tmp_path):
    md, js = tmp_path / "b.md", tmp_path / "b.json"
    md.write_text("# B\n\n<!-- benchmark:cuda:begin -->\nGPU text\n<!-- benchmark:cuda:end -->\nfooter\n")
    js.write_text(json.dumps({"cuda": {"kept": True}}))
    section = benchmark.markdown_section(results)
    for _ in range(2):  # a second run replaces the section instead of adding one
        benchmark.update_markdown(md, "cpu", section)
        benchmark.update_json(js, results)
    text = md.read_text()
    assert text.count("<!-- benchmark:cpu:begin -->") == 1 and "GPU text" in text and "footer" in text
    assert "| 64 | 1 |" in text and "tiles/s" in text and results["machine"]["cpu"] in text
    data = json.loads(js.read_text())
    assert data["cuda"] == {"kept": True} and data["cpu"]["encoder"]["outputs_agree"]
