"""gct reproduce: statistics, verdicts, sweeps on validation, paired seeds, resuming, reports."""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from scipy import stats as scipy_stats

from cyclical_training import reproduce
from cyclical_training.config import TrainConfig
from cyclical_training.data import load_dataset
from cyclical_training.errors import ConfigError, TrainingError
from cyclical_training.reproduce import (
    Candidate,
    add_reproduce_arguments,
    choose_candidate,
    parse_seeds,
    read_records,
    run_reproduce,
    write_report,
)
from cyclical_training.stats import (
    BETTER,
    NO_DETECTABLE_DIFFERENCE,
    NO_PAIRS,
    NO_TEST_ONE_SEED,
    WORSE,
    compare_paired,
    summarize,
    verdict,
)
from cyclical_training.train import Trainer, plan_run

# A small paired example worked by hand. Differences: 0.1, -0.05, 0.2, 0.2.
TREATMENT = [0.5, 0.6, 0.7, 0.9]
CONTROL = [0.4, 0.65, 0.5, 0.7]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_reproduce_arguments(parser)
    return parser.parse_args(list(argv))


def quiet(_line: str) -> None:
    pass


def run_quiet(*argv: str) -> int:
    return run_reproduce(parse(*argv), log=quiet)


class NoTraining:
    """Stand-in for Trainer that fails the test if any run starts."""

    def __init__(self, *args, **kwargs) -> None:
        raise AssertionError("a run was trained, but none should be")


class CountingTrainer(Trainer):
    """The real Trainer, counting how many runs are constructed."""

    constructed = 0

    def __init__(self, *args, **kwargs) -> None:
        CountingTrainer.constructed += 1
        super().__init__(*args, **kwargs)


# Statistics ----------------------------------------------------------------------------------------


def test_summarize_mean_and_sample_std():
    summary = summarize(TREATMENT)
    # Deviations from 0.675 are -0.175, -0.075, 0.025 and 0.225. Their squares sum to 0.0875 (ddof = 1).
    assert summary.n == 4
    assert summary.mean == pytest.approx(0.675, abs=1e-12)
    assert summary.std == pytest.approx(math.sqrt(0.0875 / 3), abs=1e-12)


def test_summarize_single_and_empty():
    single = summarize([0.7])
    assert single.mean == 0.7
    assert math.isnan(single.std)
    empty = summarize([])
    assert empty.n == 0
    assert math.isnan(empty.mean)


def test_paired_comparison_hand_computed():
    comparison = compare_paired(TREATMENT, CONTROL)
    # Mean difference 0.1125; squared deviations sum to 0.041875, so std = sqrt(0.041875 / 3).
    std = math.sqrt(0.041875 / 3)
    t_critical = 3.182446305284263  # t_{0.975, 3}
    half_width = t_critical * std / 2.0
    assert comparison.differences == pytest.approx((0.1, -0.05, 0.2, 0.2), abs=1e-12)
    assert comparison.mean == pytest.approx(0.1125, abs=1e-12)
    assert comparison.std == pytest.approx(std, abs=1e-12)
    assert comparison.ci_low == pytest.approx(0.1125 - half_width, abs=1e-9)
    assert comparison.ci_high == pytest.approx(0.1125 + half_width, abs=1e-9)
    assert comparison.ci_low == pytest.approx(-0.0754957, abs=1e-6)
    assert comparison.ci_high == pytest.approx(0.3004957, abs=1e-6)


def test_paired_comparison_matches_scipy():
    comparison = compare_paired(TREATMENT, CONTROL)
    reference = scipy_stats.ttest_rel(TREATMENT, CONTROL)
    interval = reference.confidence_interval(0.95)
    assert comparison.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert comparison.p_value == pytest.approx(0.152962, abs=1e-6)
    assert comparison.ci_low == pytest.approx(interval.low, abs=1e-9)
    assert comparison.ci_high == pytest.approx(interval.high, abs=1e-9)


def test_paired_comparison_one_pair_has_no_test():
    comparison = compare_paired([0.8], [0.7])
    assert comparison.n == 1
    assert comparison.mean == pytest.approx(0.1)
    assert comparison.ci_low is None
    assert comparison.p_value is None
    assert verdict(comparison) == NO_TEST_ONE_SEED


def test_paired_comparison_equal_differences():
    same_gain = compare_paired([0.52, 0.72, 0.92], [0.5, 0.7, 0.9])
    assert same_gain.p_value == 0.0
    assert same_gain.ci_low == pytest.approx(0.02)
    assert same_gain.ci_high == pytest.approx(0.02)
    assert verdict(same_gain) == BETTER
    no_change = compare_paired([0.5, 0.6], [0.5, 0.6])
    assert math.isnan(no_change.p_value)
    assert verdict(no_change) == NO_DETECTABLE_DIFFERENCE


def test_paired_comparison_length_mismatch_raises():
    with pytest.raises(ConfigError, match="same length"):
        compare_paired([0.1, 0.2], [0.1])


def test_verdict_cases():
    clear_gain = compare_paired([0.81, 0.82, 0.83, 0.85, 0.84], [0.80, 0.80, 0.81, 0.82, 0.82])
    clear_loss = compare_paired([0.80, 0.80, 0.81, 0.82, 0.82], [0.81, 0.82, 0.83, 0.85, 0.84])
    noisy = compare_paired(TREATMENT, CONTROL)
    assert verdict(clear_gain) == BETTER
    assert verdict(clear_loss) == WORSE
    assert verdict(noisy) == NO_DETECTABLE_DIFFERENCE
    assert verdict(compare_paired([], [])) == NO_PAIRS
    assert NO_DETECTABLE_DIFFERENCE == "no difference we can detect at this seed count"


def test_verdict_agrees_with_interval():
    for comparison in (compare_paired(TREATMENT, CONTROL), compare_paired([0.81, 0.82, 0.83, 0.85], [0.8, 0.8, 0.81, 0.82])):
        excludes_zero = comparison.ci_low > 0 or comparison.ci_high < 0
        assert (verdict(comparison) != NO_DETECTABLE_DIFFERENCE) == excludes_zero


# Arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("warmup",), "EXPERIMENT must be one of"),
        (("curriculum",), "not implemented yet"),
        (("semi-supervised",), "not implemented yet"),
        (("distillation",), "not implemented yet"),
        (("fine-tuning",), "not implemented yet"),
        (("temperature", "--preset", "tpu"), "--preset must be one of quick, cpu, gpu, got 'tpu'"),
        (("temperature", "--seeds", "0"), "--seeds must be an integer >= 1, got '0'"),
        (("temperature", "--seeds", "-2"), "--seeds must be an integer >= 1"),
        (("temperature", "--seeds", "two"), "--seeds must be an integer >= 1, got 'two'"),
        (("temperature", "--preset", "cpu", "--data-path", "/no/such/cifar.tar.gz"), "file not found"),
    ],
)
def test_invalid_arguments_raise_before_training(monkeypatch, tmp_path, argv, message):
    monkeypatch.setattr(reproduce, "Trainer", NoTraining)
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        run_quiet(*argv, "--out", str(tmp_path / "out"))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_unknown_experiment_lists_choices(monkeypatch, tmp_path):
    monkeypatch.setattr(reproduce, "Trainer", NoTraining)
    with pytest.raises(ConfigError) as caught:
        run_quiet("warm-restarts", "--out", str(tmp_path))
    text = str(caught.value)
    assert "weight-decay" in text
    assert "all" in text
    assert "got 'warm-restarts'" in text


def test_parse_seeds_accepts_numbers():
    assert parse_seeds("3", default=5) == 3
    assert parse_seeds(2, default=5) == 2
    assert parse_seeds(None, default=5) == 5
    with pytest.raises(ConfigError):
        parse_seeds(2.5, default=5)


# Training images left after the validation split, per data setting label, for the batch check.
TRAIN_IMAGES = {"digits": 1438 - 200, "cifar10-1k": 1000, "cifar10-4k": 4000, "cifar10-full": 50000 - 5000}


@pytest.mark.parametrize("preset_name", ["quick", "cpu", "gpu"])
def test_preset_configs_valid(preset_name):
    preset = reproduce.PRESETS[preset_name]
    for data in (*preset.data, *preset.data_with_path):
        for name in reproduce.EXPERIMENT_ORDER:
            for arm in reproduce.EXPERIMENTS[name].build_arms(data):
                assert len(arm.candidates) >= preset.sweep_size
                for candidate in arm.candidates[: preset.sweep_size]:
                    config = reproduce.build_config(data, arm, candidate, seed=1, archive="/data/cifar.tar.gz")
                    # Raises ConfigError for a batch size larger than the training set.
                    plan_run(config, TRAIN_IMAGES[data.label])


def test_preset_estimates_fit_budgets():
    presets = reproduce.PRESETS
    quick = presets["quick"]
    assert reproduce.estimate_seconds(quick, quick.data, reproduce.EXPERIMENT_ORDER, quick.seeds) < 120
    cpu = presets["cpu"]
    for name in reproduce.EXPERIMENT_ORDER:
        assert reproduce.estimate_seconds(cpu, cpu.data, [name], cpu.seeds) <= 45 * 60
    gpu = presets["gpu"]
    assert reproduce.estimate_seconds(gpu, gpu.data, reproduce.EXPERIMENT_ORDER[:3], gpu.seeds) <= 10 * 60


# Sweep selection ----------------------------------------------------------------------------------


def sweep_record(validation, test, status="finished"):
    return {"status": status, "final_validation_accuracy": validation, "final_test_accuracy": test}


def test_choose_candidate_uses_validation_only():
    candidates = [Candidate("a", {}), Candidate("b", {}), Candidate("c", {})]
    records = [sweep_record(0.7, 0.99), sweep_record(0.9, 0.10), sweep_record(0.8, 0.50)]
    assert choose_candidate(candidates, records).label == "b"


def test_choose_candidate_tie_goes_to_first():
    candidates = [Candidate("a", {}), Candidate("b", {})]
    assert choose_candidate(candidates, [sweep_record(0.9, 0.1), sweep_record(0.9, 0.9)]).label == "a"


def test_choose_candidate_skips_failed_runs():
    candidates = [Candidate("a", {}), Candidate("b", {})]
    records = [sweep_record(None, None, status="failed"), sweep_record(0.2, 0.2)]
    assert choose_candidate(candidates, records).label == "b"
    with pytest.raises(TrainingError, match="every sweep run failed"):
        choose_candidate(candidates, [sweep_record(None, None, status="failed")] * 2)


# Validation and test accuracy per temperature option. Validation prefers 0.5 and "0.5:2", while
# test prefers 1.0 and "1:2", so a sweep that read test accuracy would choose differently.
FAKE_SCORES = {
    1.0: (0.60, 0.95),
    0.5: (0.80, 0.10),
    "1:2": (0.50, 0.97),
    "0.5:2": (0.70, 0.20),
}


class ScoredTrainer:
    """Stand-in for Trainer whose accuracies come from FAKE_SCORES; records every config."""

    configs: list[TrainConfig] = []

    def __init__(self, config, log=None, dataset=None) -> None:
        self.config = config.validate()
        ScoredTrainer.configs.append(self.config)
        self.model_name = "fake-net"
        self.train_split = SimpleNamespace(labels=torch.zeros(10))
        self.validation_split = SimpleNamespace(labels=torch.zeros(5)) if config.validation_size else None
        self.test_split = SimpleNamespace(labels=torch.zeros(7))
        self.history: list[dict] = []

    def fit(self) -> dict:
        validation, test = FAKE_SCORES[self.config.temperature]
        for epoch in range(1, self.config.epochs + 1):
            self.history.append({
                "epoch": epoch, "train_loss": 1.0, "test_accuracy": test,
                "validation_accuracy": validation, "knobs": {"temperature": 1.0},
            })
        return {}


def test_sweep_chooses_by_validation_not_test(monkeypatch, tmp_path):
    ScoredTrainer.configs = []
    monkeypatch.setattr(reproduce, "Trainer", ScoredTrainer)
    assert run_quiet("temperature", "--seeds", "2", "--out", str(tmp_path)) == 0

    records = [record for _, record in read_records(tmp_path / "runs.jsonl")]
    final = {(record["arm"], record["seed"]): record for record in records if record["phase"] == "final"}
    assert final[("baseline", 1)]["candidate"] == "temperature=0.5"
    assert final[("cyclical", 1)]["candidate"] == "temperature=0.5:2"
    assert final[("baseline", 2)]["candidate"] == "temperature=0.5"
    sweep_configs = [config for config in ScoredTrainer.configs if config.seed == 0]
    assert len(sweep_configs) == 4
    assert all(config.validation_size > 0 for config in sweep_configs)


def test_sweep_records_phase_and_seed_zero(monkeypatch, tmp_path):
    monkeypatch.setattr(reproduce, "Trainer", ScoredTrainer)
    run_quiet("temperature", "--out", str(tmp_path))
    records = [record for _, record in read_records(tmp_path / "runs.jsonl")]
    sweep = [record for record in records if record["phase"] == "sweep"]
    assert [record["candidate"] for record in sweep] == [
        "temperature=1", "temperature=0.5", "temperature=1:2", "temperature=0.5:2",
    ]
    assert {record["seed"] for record in sweep} == {0}
    assert {record["seed"] for record in records if record["phase"] == "final"} == {1}


# Quick preset end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_all(tmp_path_factory):
    """Every experiment of the quick preset, trained for real into one folder."""
    out = tmp_path_factory.mktemp("quick")
    CountingTrainer.constructed = 0
    patch = pytest.MonkeyPatch()
    patch.setattr(reproduce, "Trainer", CountingTrainer)
    try:
        code = run_reproduce(parse("all", "--preset", "quick", "--out", str(out)), log=quiet)
    finally:
        patch.undo()
    return SimpleNamespace(out=out, code=code, constructed=CountingTrainer.constructed)


def load_records(out):
    return [record for _, record in read_records(out / "runs.jsonl")]


def test_quick_all_writes_records_report_plots(quick_all):
    assert quick_all.code == 0
    records = load_records(quick_all.out)
    # Per experiment: (2 sweep candidates + 1 seed) per arm; weight decay has 3 arms, the others 2.
    assert len(records) == 3 * 3 + 5 * 2 * 3
    assert quick_all.constructed == len(records)
    assert {record["experiment"] for record in records} == set(reproduce.EXPERIMENT_ORDER)
    report = (quick_all.out / "results.md").read_text()
    assert report.startswith("# gct reproduce")
    assert "gct reproduce all --preset quick --seeds 1" in report
    assert "- Machine: " in report
    assert "- Code version: cyclical-training" in report
    assert "no test possible with 1 seed" in report
    plots = sorted(path.name for path in (quick_all.out / "plots").glob("*.png"))
    assert len(plots) == 3 * 6
    assert "quick-weight-decay-digits-knobs.png" in plots


def test_report_summary_lists_comparisons_in_experiment_order(quick_all):
    report = (quick_all.out / "results.md").read_text()
    summary = report.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in summary.splitlines() if line.startswith("| quick |")]
    # One row per non-baseline arm: weight decay has two, every other experiment one.
    assert len(rows) == len(reproduce.EXPERIMENT_ORDER) + 1
    assert [row.split(" | ")[1] for row in rows] == [
        name for name in reproduce.EXPERIMENT_ORDER for _ in range(2 if name == "weight-decay" else 1)
    ]
    sections = [line for line in report.splitlines() if line.startswith("## ") and line != "## Summary"]
    assert len(sections) == len(reproduce.EXPERIMENT_ORDER)
    for name, section in zip(reproduce.EXPERIMENT_ORDER, sections):
        assert f"({name})" in section


def test_quick_records_fields(quick_all):
    for record in load_records(quick_all.out):
        assert record["status"] == "finished"
        assert record["phase"] in ("sweep", "final")
        assert record["config"]["seed"] == record["seed"]
        assert record["config"]["validation_size"] > 0
        assert len(record["history"]) == record["config"]["epochs"]
        assert record["final_test_accuracy"] == record["history"][-1]["test_accuracy"]
        assert record["best_test_accuracy"] == max(entry["test_accuracy"] for entry in record["history"])
        assert record["final_validation_accuracy"] == record["history"][-1]["validation_accuracy"]
        assert record["seconds"] > 0
        assert "knobs" in record["history"][0]


def test_weight_decay_has_constant_lr_arm(quick_all):
    records = [record for record in load_records(quick_all.out) if record["experiment"] == "weight-decay"]
    arms = {record["arm"]: record for record in records if record["phase"] == "final"}
    assert set(arms) == {"baseline", "cyclical", "cyclical-constant-lr"}
    assert arms["cyclical-constant-lr"]["config"]["lr_schedule"] == "constant"
    assert arms["cyclical"]["config"]["lr_schedule"] == "warmup-cosine"
    assert arms["baseline"]["config"]["lr_schedule"] == "warmup-cosine"
    assert "constant learning rate" in (quick_all.out / "results.md").read_text()


def test_seeds_paired_across_arms(quick_all):
    # The options that may differ between arms: the experiment's knob, and the lr schedule of
    # the constant-lr arm. Everything else, the seed included, must match.
    varied = {"weight_decay", "temperature", "clip_norm", "batch_size", "loss", "gamma_hc", "gamma_neg",
              "augment", "lr_schedule"}
    records = [record for record in load_records(quick_all.out) if record["phase"] == "final"]
    for experiment in reproduce.EXPERIMENT_ORDER:
        arms = [record for record in records if record["experiment"] == experiment]
        assert len({record["arm"] for record in arms}) == len(arms) >= 2
        shared = [{key: value for key, value in record["config"].items() if key not in varied} for record in arms]
        assert all(options == shared[0] for options in shared)
        assert {record["config"]["seed"] for record in arms} == {1}


def test_paired_seeds_share_subset_and_weights(quick_all):
    records = [
        record for record in load_records(quick_all.out)
        if record["experiment"] == "temperature" and record["phase"] == "final"
    ]
    digits = load_dataset("digits")
    trainers = [Trainer(TrainConfig.from_dict(record["config"]), log=quiet, dataset=digits) for record in records]
    first, second = trainers
    assert torch.equal(first.train_split.labels, second.train_split.labels)
    assert torch.equal(first.train_split.images, second.train_split.images)
    assert torch.equal(first.validation_split.labels, second.validation_split.labels)
    for (name, tensor), (_, other) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(tensor, other), name


def test_second_run_trains_nothing(quick_all, monkeypatch, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(quick_all.out, out)
    CountingTrainer.constructed = 0
    monkeypatch.setattr(reproduce, "Trainer", CountingTrainer)
    assert run_quiet("all", "--preset", "quick", "--out", str(out)) == 0
    assert CountingTrainer.constructed == 0
    assert len(load_records(out)) == len(load_records(quick_all.out))


def test_interrupted_run_continues(quick_all, monkeypatch, tmp_path):
    out = tmp_path / "cut"
    shutil.copytree(quick_all.out, out)
    runs = out / "runs.jsonl"
    lines = [line for line in runs.read_text().splitlines() if '"experiment": "temperature"' in line]
    # Keep temperature's records but the last one, and end the file in a half-written line.
    runs.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    CountingTrainer.constructed = 0
    monkeypatch.setattr(reproduce, "Trainer", CountingTrainer)
    assert run_quiet("temperature", "--preset", "quick", "--out", str(out)) == 0
    assert CountingTrainer.constructed == 1
    records = load_records(out)
    assert len(records) == len(lines)
    assert runs.read_text().endswith("\n")


def test_more_seeds_train_only_new_ones(quick_all, monkeypatch, tmp_path):
    out = tmp_path / "more"
    shutil.copytree(quick_all.out, out)
    CountingTrainer.constructed = 0
    monkeypatch.setattr(reproduce, "Trainer", CountingTrainer)
    assert run_quiet("clipping", "--preset", "quick", "--seeds", "2", "--out", str(out)) == 0
    # Seed 2 of both arms; the sweep and seed 1 are reused.
    assert CountingTrainer.constructed == 2


def test_write_report_rebuilds_from_records(quick_all, tmp_path):
    out = tmp_path / "rebuilt"
    out.mkdir()
    shutil.copy(quick_all.out / "runs.jsonl", out / "runs.jsonl")
    path = write_report(out)
    report = path.read_text()
    original = (quick_all.out / "results.md").read_text()
    assert "rebuilt from runs.jsonl" in report
    section = original[original.index("## "):]
    assert report[report.index("## "):] == section
    assert len(list((out / "plots").glob("*.png"))) == 3 * 6


# Report numbers --------------------------------------------------------------------------------


def synthetic_record(arm, seed, accuracy, phase="final", status="finished", validation=0.5):
    config = TrainConfig(epochs=2, validation_size=100, seed=seed).to_dict()
    history = [
        {"epoch": 1, "test_accuracy": accuracy - 0.1, "validation_accuracy": validation, "train_loss": 1.0,
         "knobs": {"lr": 0.1, "temperature": 1.0}},
        {"epoch": 2, "test_accuracy": accuracy, "validation_accuracy": validation, "train_loss": 0.5,
         "knobs": {"lr": 0.05, "temperature": 1.0}},
    ]
    finished = status == "finished"
    return {
        "experiment": "temperature", "experiment_title": "Cyclical softmax temperature", "experiment_note": "",
        "knob": "temperature", "preset": "cpu", "dataset": "digits", "dataset_title": "digits",
        "test_images_requested": None, "arm": arm, "arm_description": f"{arm} arm", "phase": phase,
        "seed": seed, "candidate": f"temperature for {arm}", "config": config, "status": status,
        "error": None if finished else "training stopped: the loss is not finite", "model": "digits-net",
        "train_images": 1238, "validation_images": 200, "test_images": 359,
        "final_test_accuracy": accuracy if finished else None, "best_test_accuracy": accuracy,
        "best_epoch": 2, "final_validation_accuracy": validation if finished else None,
        "history": history if finished else history[:1], "seconds": 1.0,
    }


def test_report_numbers_match_records(tmp_path):
    records = [synthetic_record("baseline", 0, 0.5, phase="sweep"), synthetic_record("cyclical", 0, 0.5, phase="sweep")]
    for seed, (treated, control) in enumerate(zip(TREATMENT, CONTROL), start=1):
        records.append(synthetic_record("baseline", seed, control))
        records.append(synthetic_record("cyclical", seed, treated))
    records.append(synthetic_record("baseline", 5, 0.6))
    records.append(synthetic_record("cyclical", 5, 0.0, status="failed"))
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))

    report = write_report(tmp_path).read_text()
    comparison = compare_paired(TREATMENT, CONTROL)
    assert f"| cyclical - baseline | 1, 2, 3, 4 | {100 * comparison.mean:+.2f} |" in report
    assert f"[{100 * comparison.ci_low:+.2f}, {100 * comparison.ci_high:+.2f}]" in report
    assert f"| {comparison.p_value:.3g} | {NO_DETECTABLE_DIFFERENCE} |" in report
    cyclical = summarize(TREATMENT)
    assert f"| cyclical | 4 (+1 failed) | {100 * cyclical.mean:.2f}% | {100 * cyclical.std:.2f} points |" in report
    baseline = summarize(CONTROL + [0.6])
    assert f"| baseline | 5 | {100 * baseline.mean:.2f}% |" in report
    assert "Failed run, line 12" in report
    assert "| 1 | 40.00% (line 3) | 50.00% (line 4) |" in report
    assert "Runs trained by" not in report
