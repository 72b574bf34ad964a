"""Per-step cost of the clock and of every knob at once, against a plain hand-written PyTorch loop.

All variants train the same model (fast-cnn by default) on the same batches of random 32x32
uint8 images with SGD (Nesterov momentum, the same two weight-decay groups). The knob run turns
on every knob: learning rate, momentum, weight decay, temperature, gradient clipping, batch
size, cyclical focal loss and augmentation magnitude, all on a step-unit clock. Its steps are
taken in the middle of the run, where every knob lies strictly between its ends, so no knob
takes its shortcut for difficulty 0 or 1.

Two kinds of measurement:

* Whole steps, timed between batch requests (``TimedBatches``), for three variants.
  ``plain`` is a hand-written loop: normalize, crop and flip, cross entropy, SGD.
  ``trainer_all_knobs`` is ``Trainer.train_epoch`` with every knob. ``plain_equal_work`` is a
  hand-written loop that does the knob run's work with fixed values: the same augmentation
  magnitude, temperature, cyclical focal loss, clipping and optimizer settings.
  ``trainer_all_knobs / plain_equal_work`` is the cost of the library at equal work, and
  ``trainer_all_knobs / plain`` the cost of switching every knob on.
* Parts, timed in blocks of calls: ``knobs.apply(clock)`` + ``clock.step()``, the loss
  (forward and backward) for plain ``F.cross_entropy``, the library's ``cross_entropy`` with a
  temperature and ``cyclical_focal_loss``, gradient clipping, and augmentation.

The knob overhead checked against the 1 % target is the clock and knob update plus the extra
time of the cyclical focal loss over plain cross entropy, divided by the plain step's median.
Whole-step ratios on a shared machine are only good to a few percent, which is why the parts
are timed on their own.

    python benchmarks/knob_overhead.py            # a few minutes on 2 CPU cores
    python benchmarks/knob_overhead.py --quick    # seconds; the numbers mean nothing
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from common import (
    StepTimer, TimedBatches, autocast_for, base_parser, command_line, decay_groups, machine_info,
    pick_device, plain_batches, precision_for, print_table, random_dataset, result_path, rotated,
    summarize, time_per_call, write_result,
)
from cyclical_training.augment import augment, normalize, random_crop_flip
from cyclical_training.clock import Clock
from cyclical_training.config import TrainConfig
from cyclical_training.losses import cross_entropy, cyclical_focal_loss
from cyclical_training.models import build_model
from cyclical_training.train import Trainer

EPOCHS = 10
# Every knob, each a cycle. The batch-size knob (512:128) is computed every step like the
# others, but the measured steps take their batches from --batch-size, so all variants see
# equal batches.
KNOB_SETTINGS = {
    "lr": "0.2:0.05",
    "momentum": "0.85:0.95",
    "weight_decay": "5e-4:5e-3",
    "temperature": "0.5:2",
    "clip_norm": "1:4",
    "batch_size": "512:128",
    "augment": "0.25:1",
    "loss": "cyclical-focal",
    "cycle_unit": "step",
}
STEP_VARIANTS = ("plain", "trainer_all_knobs", "plain_equal_work")


def parse_args():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fast-cnn", help="model name (default fast-cnn)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (default 256)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant and repeat (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed run (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every variant (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable cores)")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.repeats = 16, 4, 1, 1
        # With OpenMP's default active waiting, 2 threads on a busy 2-core machine were up to
        # 5x slower than 1 in a short probe.
        args.threads = args.threads or 1
    return args


class Setup:
    """The trainer with every knob, the plain model and the equal-work model, on shared data."""

    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device = args, device
        images_needed = args.batch_size * (args.steps + args.warmup)
        self.dataset = random_dataset(max(images_needed, 512), 64, seed=args.seed)
        config = TrainConfig(
            data="random", model=args.model, epochs=EPOCHS, seed=args.seed, progress=False,
            num_threads=args.threads, precision=precision_for(device), **KNOB_SETTINGS,
        )
        self.trainer = Trainer(config, log=lambda _line: None, dataset=self.dataset)
        self.images = self.trainer.train_split.images.to(device)
        self.labels = self.trainer.train_split.labels.to(device)
        self.threads = torch.get_num_threads()
        self.memory_format = self.trainer.memory_format
        self.mean, self.std = self.dataset.mean, self.dataset.std

        # Mid-run position: epoch 4 of 10 on a step clock, so 0 < difficulty < 1 for every knob.
        self.middle_epoch = EPOCHS // 2 - 1
        self.reset_clock()
        self.values = self.trainer.knobs.values(self.trainer.clock)
        self.difficulty = self.trainer.clock.difficulty

        self.plain_model, self.plain_optimizer = self._plain_model(weight_decay=5e-4, lr=0.1, momentum=0.9)
        self.equal_model, self.equal_optimizer = self._plain_model(
            weight_decay=self.values["weight_decay"], lr=self.values["lr"], momentum=self.values["momentum"],
        )

    def reset_clock(self) -> None:
        clock = self.trainer.clock
        clock.start_epoch(self.middle_epoch)
        # Start a few steps into the epoch, away from the epoch's first step.
        for _ in range(3):
            clock.step()

    def _plain_model(self, weight_decay: float, lr: float, momentum: float):
        torch.manual_seed(self.args.seed)
        model = build_model(self.args.model, self.dataset.num_classes).to(self.device, memory_format=self.memory_format)
        optimizer = torch.optim.SGD(decay_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=True)
        return model, optimizer

    def batches(self, repeat: int):
        return plain_batches(self.images, self.labels, self.args.batch_size, seed=self.args.seed + repeat)


# ---------------------------------------------------------------------------------------------
# whole steps


def run_plain(setup: Setup, repeat: int) -> list[float]:
    """Hand-written loop: normalize, random crop and flip, cross entropy, SGD step."""
    model, optimizer, device = setup.plain_model, setup.plain_optimizer, setup.device
    generator = torch.Generator().manual_seed(repeat)
    timer = StepTimer(device)
    model.train()
    for images, labels in TimedBatches(setup.batches(repeat), timer, setup.args.warmup + setup.args.steps):
        x = normalize(images, setup.mean, setup.std)
        x = random_crop_flip(x, padding=4, generator=generator).contiguous(memory_format=setup.memory_format)
        with autocast_for(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return timer.durations()[setup.args.warmup:]


def run_equal_work(setup: Setup, repeat: int) -> list[float]:
    """Hand-written loop doing the knob run's work with the knob values fixed at the start."""
    model, optimizer, device = setup.equal_model, setup.equal_optimizer, setup.device
    values, difficulty = setup.values, setup.difficulty
    parameters = list(model.parameters())
    generator = torch.Generator().manual_seed(repeat)
    timer = StepTimer(device)
    model.train()
    for images, labels in TimedBatches(setup.batches(repeat), timer, setup.args.warmup + setup.args.steps):
        x = normalize(images, setup.mean, setup.std)
        x = augment(x, values["augment"], generator=generator).contiguous(memory_format=setup.memory_format)
        with autocast_for(device):
            logits = model(x)
        loss = cyclical_focal_loss(logits.float() / values["temperature"], labels, difficulty, label_smoothing=0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, values["clip_norm"])
        optimizer.step()
    return timer.durations()[setup.args.warmup:]


def run_trainer(setup: Setup, repeat: int) -> list[float]:
    """``Trainer.train_epoch`` with every knob, fed the same batches as the plain loops."""
    timer = StepTimer(setup.device)
    setup.reset_clock()
    batches = TimedBatches(setup.batches(repeat), timer, setup.args.warmup + setup.args.steps)
    setup.trainer.train_epoch(setup.middle_epoch, batches)
    return timer.durations()[setup.args.warmup:]


STEP_RUNNERS = {"plain": run_plain, "trainer_all_knobs": run_trainer, "plain_equal_work": run_equal_work}


# ---------------------------------------------------------------------------------------------
# parts


def part_timers(setup: Setup) -> dict:
    """Return a zero-argument function per part, which runs the part once per call."""
    args, device, trainer = setup.args, setup.device, setup.trainer
    values = setup.values
    generator = torch.Generator().manual_seed(args.seed)
    logits = torch.randn(args.batch_size, setup.dataset.num_classes, device=device, requires_grad=True)
    labels = torch.randint(0, setup.dataset.num_classes, (args.batch_size,), device=device)
    images = setup.dataset.train_images[: args.batch_size].to(device)
    normalized = normalize(images, setup.mean, setup.std)

    # Gradients for the clipping part come from one real backward pass.
    model = setup.equal_model
    with autocast_for(device):
        loss = F.cross_entropy(model(normalized.contiguous(memory_format=setup.memory_format)).float(), labels)
    loss.backward()
    parameters = list(model.parameters())

    # A clock like the trainer's but with room for every timed call in the middle of the run,
    # so that repeated steps never reach the last step, where the difficulty is 0.
    clock = Clock(epochs=EPOCHS, steps_per_epoch=10**6, peak=trainer.clock.peak, unit="step")
    clock.start_epoch(setup.middle_epoch)

    def knobs_and_clock():
        trainer.knobs.apply(clock)
        clock.step()

    def loss_plain_ce():
        logits.grad = None
        F.cross_entropy(logits, labels).backward()

    def loss_library_ce():
        logits.grad = None
        cross_entropy(logits, labels, temperature=values["temperature"]).backward()

    def loss_cyclical_focal():
        logits.grad = None
        cyclical_focal_loss(logits / values["temperature"], labels, setup.difficulty, label_smoothing=0.0).backward()

    def clip_gradients():
        torch.nn.utils.clip_grad_norm_(parameters, values["clip_norm"])

    def crop_flip():
        random_crop_flip(normalized, padding=4, generator=generator)

    def augment_knob():
        augment(normalized, values["augment"], generator=generator)

    return {
        "knobs_apply_and_clock_step": knobs_and_clock,
        "loss_plain_cross_entropy": loss_plain_ce,
        "loss_library_cross_entropy_with_temperature": loss_library_ce,
        "loss_cyclical_focal": loss_cyclical_focal,
        "clip_grad_norm": clip_gradients,
        "augment_random_crop_flip": crop_flip,
        "augment_knob_magnitude": augment_knob,
    }


# Calls per timed block: small parts are timed over many calls to stay above timer resolution.
PART_CALLS = {"knobs_apply_and_clock_step": 200}
DEFAULT_PART_CALLS = 20


# ---------------------------------------------------------------------------------------------
# main


def main() -> None:
    args = parse_args()
    device = pick_device()
    machine = machine_info(device)
    setup = Setup(args, device)
    parts = part_timers(setup)

    step_times = {name: [] for name in STEP_VARIANTS}
    repeat_medians = {name: [] for name in STEP_VARIANTS}
    part_times = {name: [] for name in parts}
    blocks = 3 if args.quick else 10
    for repeat in range(args.repeats):
        for name in rotated(STEP_VARIANTS, repeat):
            torch.set_num_threads(setup.threads)
            times = STEP_RUNNERS[name](setup, repeat)
            step_times[name].extend(times)
            repeat_medians[name].append(statistics.median(times))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: median step {1000 * repeat_medians[name][-1]:.1f} ms")
        for name in rotated(list(parts), repeat):
            calls = PART_CALLS.get(name, DEFAULT_PART_CALLS)
            part_times[name].extend(time_per_call(parts[name], calls, blocks, device))

    payload = build_result(args, setup, machine, step_times, repeat_medians, part_times)
    write_result(result_path(args.out, "knob_overhead", args.quick), payload)
    print_report(payload)


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Return the median and range of per-repeat ratios, whose two sides ran close in time."""
    ratios = [top / bottom for top, bottom in zip(numerator, denominator)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "per_repeat": ratios}


def build_result(args, setup: Setup, machine: dict, step_times, repeat_medians, part_times) -> dict:
    steps = {name: summarize(times) for name, times in step_times.items()}
    parts = {name: summarize(times) for name, times in part_times.items()}
    plain_step = steps["plain"]["median_s"]

    def median_of(name: str) -> float:
        return parts[name]["median_s"]

    control = median_of("knobs_apply_and_clock_step")
    loss_extra = median_of("loss_cyclical_focal") - median_of("loss_plain_cross_entropy")
    library_ce_extra = median_of("loss_library_cross_entropy_with_temperature") - median_of("loss_plain_cross_entropy")
    augment_extra = median_of("augment_knob_magnitude") - median_of("augment_random_crop_flip")
    clip = median_of("clip_grad_norm")
    overhead = control + loss_extra
    return {
        "benchmark": "knob_overhead",
        "quick": args.quick,
        "machine": machine,
        "command": command_line(),
        "model": args.model,
        "batch_size": args.batch_size,
        "timed_steps_per_repeat": args.steps,
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "threads": setup.threads,
        "knob_settings": KNOB_SETTINGS,
        "knob_values_at_measured_step": setup.values,
        "difficulty_at_measured_step": setup.difficulty,
        "step_seconds": steps,
        "step_median_per_repeat_s": repeat_medians,
        "part_seconds": parts,
        "whole_step_ratios": {
            "trainer_all_knobs_over_plain": paired_ratio(repeat_medians["trainer_all_knobs"], repeat_medians["plain"]),
            "trainer_all_knobs_over_plain_equal_work": paired_ratio(
                repeat_medians["trainer_all_knobs"], repeat_medians["plain_equal_work"]),
        },
        "fraction_of_plain_step": {
            "knobs_apply_and_clock_step": control / plain_step,
            "cyclical_focal_loss_extra_over_cross_entropy": loss_extra / plain_step,
            "knob_overhead": overhead / plain_step,
            "library_cross_entropy_extra_over_plain": library_ce_extra / plain_step,
            "clip_grad_norm": clip / plain_step,
            "augment_knob_extra_over_crop_flip": augment_extra / plain_step,
            "all_parts": (overhead + clip + augment_extra) / plain_step,
        },
        "target": {"knob_overhead_max_fraction": 0.01, "met": overhead / plain_step <= 0.01},
    }


def print_report(payload: dict) -> None:
    print()
    rows = []
    for name, summary in payload["step_seconds"].items():
        rows.append((name, 1000 * summary["median_s"], 1000 * summary["p25_s"], 1000 * summary["p75_s"], summary["count"]))
    print_table(("whole step", "median ms", "p25 ms", "p75 ms", "steps"), rows)
    print()
    rows = [(name, 1e6 * summary["median_s"]) for name, summary in payload["part_seconds"].items()]
    print_table(("part", "median us per call"), rows)
    print()
    rows = [(name, f"{100 * value:.3f} %") for name, value in payload["fraction_of_plain_step"].items()]
    for name, ratio in payload["whole_step_ratios"].items():
        rows.append((name, f"{ratio['median']:.3f}x (range {ratio['min']:.3f}-{ratio['max']:.3f})"))
    print_table(("quantity", "value"), rows)
    target = payload["target"]
    verdict = "met" if target["met"] else "missed"
    print(f"knob overhead target <= {100 * target['knob_overhead_max_fraction']:.0f} % of a plain step: {verdict}")


if __name__ == "__main__":
    main()
