"""Smoke tests of the benchmark scripts: each runs with --quick and writes a JSON result file.

The four scripts start together as subprocesses, because each spends most of its few seconds
importing torch and waiting on small steps, and the file should finish well within a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = ("knob_overhead", "throughput", "data_load", "time_to_accuracy")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> dict:
    """Run every script with --quick at once and return each one's JSON, or its failure output."""
    out = tmp_path_factory.mktemp("benchmark-results")
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
        )
        for name in SCRIPTS
    }
    results = {}
    for name, process in processes.items():
        try:
            output, _ = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            output = f"timed out after {TIMEOUT_S} s\n{output}"
        path = out / f"{name}.quick.json"
        if process.returncode == 0 and path.is_file():
            results[name] = json.loads(path.read_text())
        else:
            results[name] = {"failed": f"exit status {process.returncode}\n{output[-3000:]}"}
    return results


def load(quick_results: dict, name: str) -> dict:
    result = quick_results[name]
    assert "failed" not in result, result.get("failed")
    assert result["benchmark"] == name
    assert result["quick"] is True
    for key in ("cpu_model", "usable_cores", "torch", "date_utc", "device"):
        assert key in result["machine"]
    return result


def test_knob_overhead_quick_writes_keys(quick_results):
    result = load(quick_results, "knob_overhead")
    assert set(result["step_seconds"]) == {"plain", "trainer_all_knobs", "plain_equal_work"}
    for summary in result["step_seconds"].values():
        assert summary["median_s"] > 0
    assert "knobs_apply_and_clock_step" in result["part_seconds"]
    assert "loss_cyclical_focal" in result["part_seconds"]
    assert "knob_overhead" in result["fraction_of_plain_step"]
    assert set(result["whole_step_ratios"]) == {
        "trainer_all_knobs_over_plain", "trainer_all_knobs_over_plain_equal_work",
    }
    assert isinstance(result["target"]["met"], bool)
    assert 0 < result["difficulty_at_measured_step"] < 1


def test_throughput_quick_writes_keys(quick_results):
    result = load(quick_results, "throughput")
    assert set(result["models"]) == {"fast-cnn", "resnet18"}
    for model in result["models"].values():
        assert {"trainer", "plain", "dataloader_w0", "trainer_contiguous"} <= set(model["variants"])
        assert model["variants"]["trainer"]["images_per_second"] > 0
        assert {"trainer_over_plain", "trainer_over_best_dataloader", "channels_last_speedup"} <= set(model["ratios"])
        assert model["flops_per_step"] > 0
        assert model["achieved_fraction_of_matmul"] > 0
        assert "batched_loader_crop_flip" in model["pipeline"]
    assert "trainer_compile" in result["models"]["fast-cnn"]["notes"]
    assert result["matmul"]["flops_per_second"] > 0
    assert set(result["targets"]) == {"fast-cnn", "resnet18"}


def test_data_load_quick_writes_keys(quick_results):
    result = load(quick_results, "data_load")
    assert len(result["first_load_s"]) == 1
    assert len(result["later_load_s"]) == 2
    assert result["images"] == 200
    assert result["speedup_later_over_first"] > 0
    assert isinstance(result["target"]["met"], bool)


def test_time_to_accuracy_quick_writes_keys(quick_results):
    result = load(quick_results, "time_to_accuracy")
    assert result["settings"]["data"] == "digits"
    assert result["epochs"], "no epoch was recorded"
    first = result["epochs"][0]
    for key in ("epoch", "test_accuracy", "seconds_since_fit_start", "seconds_since_script_start"):
        assert key in first
    assert result["best"] is not None
    assert isinstance(result["reached_target"], bool)
    assert result["stop_reason"] in ("target reached", "time cap reached", "all epochs finished")
