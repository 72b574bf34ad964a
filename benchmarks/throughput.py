"""Training images per second of ``Trainer.train_epoch`` against two hand-written PyTorch loops.

For each model (fast-cnn and resnet18 by default), every variant trains on the same random
32x32 uint8 images with SGD (Nesterov momentum, weight decay on weights of 2 or more dims):

* ``trainer``: ``Trainer.train_epoch``, the loop of ``gct train``, fed by the library's
  ``BatchLoader`` with the default settings (cross entropy, crop and flip, channels-last).
* ``plain``: a hand-written loop with the same batched augmentation (``normalize`` and
  ``random_crop_flip`` on the whole batch). Target: ``trainer`` >= 0.98x of it.
* ``dataloader_wN``: a hand-written loop fed by ``torch.utils.data.DataLoader`` with N worker
  processes, whose data set pads, crops, flips and normalises one image at a time in
  ``__getitem__``, as CIFAR tutorials do with torchvision transforms. Target: ``trainer`` >= 2x
  the faster of these.
* ``trainer_contiguous``, ``trainer_1_thread``, ``trainer_compile``: the trainer with
  ``channels_last=False``, with one CPU thread, and with ``compile=True`` (``torch.compile``).

A step is timed from one batch request to the next (``TimedBatches``), so it includes fetching
the batch. Each variant runs ``--warmup`` untimed and ``--steps`` timed steps per repeat, the
variants take turns within a repeat, and the order rotates between repeats. Images per second
is the batch size over the median step time, and every ratio is the median of per-repeat ratios.

The script also counts the FLOPs of one training step (forward and backward) with
``torch.utils.flop_counter.FlopCounterMode``, which counts matrix multiplications and
convolutions only, and compares the achieved FLOP/s with a float32 square matmul timed in the
same run. ``pipeline`` times batch preparation alone, without a model.

On CUDA the loops use bf16 autocast and CUDA-event timing.

    python benchmarks/throughput.py            # about 15 minutes on 2 CPU cores
    python benchmarks/throughput.py --quick    # seconds; the numbers mean nothing
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from common import (
    StepTimer, TimedBatches, autocast_for, base_parser, command_line, decay_groups, machine_info,
    pick_device, plain_batches, precision_for, print_table, random_dataset, result_path, rotated,
    summarize, synchronize, time_per_call, write_result,
)
from cyclical_training.augment import normalize, random_crop_flip
from cyclical_training.config import TrainConfig
from cyclical_training.data import BatchLoader, ImageDataset
from cyclical_training.models import build_model
from cyclical_training.train import Trainer

LR, MOMENTUM, WEIGHT_DECAY, PADDING = 0.1, 0.9, 5e-4, 4


def parse_args():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="fast-cnn,resnet18", help="comma-separated model names")
    parser.add_argument("--batch-size", type=int, default=256, help="fast-cnn and other models' batch (default 256)")
    parser.add_argument("--resnet-batch-size", type=int, default=64, help="resnet18 batch (default 64)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant and repeat (default 30)")
    parser.add_argument("--resnet-steps", type=int, default=5, help="resnet18 timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed run (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every variant (default 3)")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts to compare (default 0,2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable cores)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul (default 2048)")
    args = parser.parse_args()
    args.model_names = [name.strip() for name in args.models.split(",") if name.strip()]
    args.worker_counts = [int(count) for count in args.workers.split(",")]
    if args.quick:
        args.batch_size, args.resnet_batch_size = 8, 2
        args.steps, args.resnet_steps, args.warmup, args.repeats = 2, 1, 1, 1
        args.worker_counts, args.no_compile, args.matmul_size = [0], True, 256
        # With OpenMP's default active waiting, 2 threads on a busy 2-core machine were up to
        # 5x slower than 1 in a short probe.
        args.threads = args.threads or 1
    return args


class ModelPlan:
    """Sizes of one model's measurement."""

    def __init__(self, args, name: str) -> None:
        is_resnet = name == "resnet18"
        self.name = name
        self.batch_size = args.resnet_batch_size if is_resnet else args.batch_size
        self.steps = args.resnet_steps if is_resnet else args.steps
        self.warmup = 1 if is_resnet and not args.quick else args.warmup
        self.repeats = args.repeats

    @property
    def steps_per_run(self) -> int:
        return self.warmup + self.steps


# ---------------------------------------------------------------------------------------------
# variants


class PerSampleCrops(torch.utils.data.Dataset):
    """Pad with zeros, crop at a random offset, flip with probability 0.5 and normalise, per image.

    This is the per-sample pipeline of CIFAR tutorials (torchvision's RandomCrop(32, padding=4),
    RandomHorizontalFlip, ToTensor and Normalize) written in plain torch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, padding: int) -> None:
        self.images, self.labels, self.padding = images, labels, padding
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        height, width = image.shape[-2:]
        padded = F.pad(image, (self.padding,) * 4)
        top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
        crop = padded[:, top:top + height, left:left + width]
        if torch.rand(()).item() < 0.5:
            crop = crop.flip(-1)
        x = crop.to(torch.float32).div_(255.0)
        return (x - self.mean) / self.std, self.labels[index]


class Variant:
    """One way of training a model; ``run`` returns the timed step durations of one pass."""

    def __init__(self, name: str, plan: ModelPlan, dataset: ImageDataset, device: torch.device, threads: int) -> None:
        self.name, self.plan, self.dataset, self.device, self.threads = name, plan, dataset, device, threads
        self.memory_format = torch.channels_last

    def _model_and_optimizer(self, seed: int):
        torch.manual_seed(seed)
        model = build_model(self.plan.name, self.dataset.num_classes).to(self.device, memory_format=self.memory_format)
        optimizer = torch.optim.SGD(decay_groups(model, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM, nesterov=True)
        return model, optimizer

    def _step(self, model, optimizer, x: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast_for(self.device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


class TrainerVariant(Variant):
    def __init__(self, name, plan, dataset, device, threads, seed: int, **options) -> None:
        super().__init__(name, plan, dataset, device, threads)
        # A constant learning rate, like the plain loops.
        config = TrainConfig(
            data="random", model=plan.name, epochs=1, batch_size=plan.batch_size, lr=LR,
            lr_schedule="constant", momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, seed=seed, progress=False,
            num_threads=threads, precision=precision_for(device), **options,
        )
        self.trainer = Trainer(config, log=lambda _line: None, dataset=dataset)
        self.loader = BatchLoader(
            self.trainer.train_split.images, self.trainer.train_split.labels, plan.batch_size,
            shuffle=True, seed=seed, drop_last=True, device=device,
        )

    def run(self, repeat: int) -> list[float]:
        timer = StepTimer(self.device)
        self.trainer.clock.start_epoch(0)
        self.loader.set_epoch(repeat)
        self.trainer.train_epoch(0, TimedBatches(self.loader, timer, self.plan.steps_per_run))
        return timer.durations()[self.plan.warmup:]


class PlainVariant(Variant):
    def __init__(self, name, plan, dataset, device, threads, seed: int) -> None:
        super().__init__(name, plan, dataset, device, threads)
        self.model, self.optimizer = self._model_and_optimizer(seed)
        self.images = dataset.train_images.to(device)
        self.labels = dataset.train_labels.to(device)
        self.mean, self.std = dataset.mean, dataset.std

    def run(self, repeat: int) -> list[float]:
        timer = StepTimer(self.device)
        generator = torch.Generator().manual_seed(repeat)
        self.model.train()
        batches = plain_batches(self.images, self.labels, self.plan.batch_size, seed=repeat)
        for images, labels in TimedBatches(batches, timer, self.plan.steps_per_run):
            x = normalize(images, self.mean, self.std)
            x = random_crop_flip(x, padding=PADDING, generator=generator).contiguous(memory_format=self.memory_format)
            self._step(self.model, self.optimizer, x, labels)
        return timer.durations()[self.plan.warmup:]


class DataLoaderVariant(Variant):
    def __init__(self, name, plan, dataset, device, threads, seed: int, workers: int) -> None:
        super().__init__(name, plan, dataset, device, threads)
        self.model, self.optimizer = self._model_and_optimizer(seed)
        samples = PerSampleCrops(dataset.train_images, dataset.train_labels, dataset.mean, dataset.std, PADDING)
        self.loader = torch.utils.data.DataLoader(
            samples, batch_size=plan.batch_size, shuffle=True, num_workers=workers, drop_last=True,
            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed),
        )

    def run(self, repeat: int) -> list[float]:
        timer = StepTimer(self.device)
        self.model.train()
        for images, labels in TimedBatches(self.loader, timer, self.plan.steps_per_run):
            x = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            self._step(self.model, self.optimizer, x, labels.to(self.device, non_blocking=True))
        return timer.durations()[self.plan.warmup:]


def build_variants(args, plan: ModelPlan, dataset: ImageDataset, device: torch.device, threads: int) -> tuple[dict, dict]:
    """Return the variants to time and the notes on any that could not be built or were skipped."""
    seed = args.seed
    variants = {
        "trainer": TrainerVariant("trainer", plan, dataset, device, threads, seed),
        "plain": PlainVariant("plain", plan, dataset, device, threads, seed),
    }
    for workers in args.worker_counts:
        name = f"dataloader_w{workers}"
        variants[name] = DataLoaderVariant(name, plan, dataset, device, threads, seed, workers)
    variants["trainer_contiguous"] = TrainerVariant(
        "trainer_contiguous", plan, dataset, device, threads, seed, channels_last=False)
    notes = {}
    if plan.name != "resnet18":
        if threads > 1:
            variants["trainer_1_thread"] = TrainerVariant("trainer_1_thread", plan, dataset, device, 1, seed)
        else:
            notes["trainer_1_thread"] = "skipped: the default already uses 1 thread"
        if args.no_compile:
            notes["trainer_compile"] = "skipped: --no-compile or --quick"
        else:
            compiled, note = build_compiled(plan, dataset, device, threads, seed)
            notes["trainer_compile"] = note
            if compiled is not None:
                variants["trainer_compile"] = compiled
    return variants, notes


def build_compiled(plan, dataset, device, threads, seed) -> tuple[Variant | None, str]:
    """Build the compile variant and time its first pass, which includes the compilation."""
    try:
        torch.set_num_threads(threads)
        variant = TrainerVariant("trainer_compile", plan, dataset, device, threads, seed, compile=True)
        started = time.perf_counter()
        variant.run(repeat=0)
        synchronize(device)
        return variant, f"compiled; first pass of {plan.steps_per_run} steps took {time.perf_counter() - started:.1f} s"
    # torch.compile can fail in many ways on a given machine (no compiler, an unsupported
    # operator, a backend error), and any failure is a result to record, not a crash.
    except Exception as error:  # noqa: BLE001
        return None, f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


# ---------------------------------------------------------------------------------------------
# FLOPs, matmul and batch preparation alone


def count_step_flops(plan: ModelPlan, dataset: ImageDataset, device: torch.device, seed: int) -> int:
    """Count the FLOPs of one forward and backward pass on a fresh model, as FlopCounterMode does."""
    variant = Variant("flops", plan, dataset, device, torch.get_num_threads())
    model, optimizer = variant._model_and_optimizer(seed)
    images = dataset.train_images[: plan.batch_size].to(device)
    labels = dataset.train_labels[: plan.batch_size].to(device)
    x = normalize(images, dataset.mean, dataset.std).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        variant._step(model, optimizer, x, labels)
    return int(counter.get_total_flops())


def time_matmul(size: int, device: torch.device, quick: bool, dtype=torch.float32) -> dict:
    """Time a square matmul; its FLOP/s use the fastest block, as a reference for the peak."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    torch.mm(a, b)
    times = time_per_call(lambda: torch.mm(a, b), calls=2 if quick else 3, blocks=3 if quick else 10, device=device)
    flops = 2 * size**3
    return {
        "size": size,
        "dtype": str(dtype),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "flops_per_second": flops / min(times),
        "median_flops_per_second": flops / statistics.median(times),
    }


def time_pipelines(args, plan: ModelPlan, dataset: ImageDataset, device: torch.device) -> dict:
    """Seconds per batch to prepare augmented batches, with no model: batched against per-sample."""
    results = {}
    loader = BatchLoader(dataset.train_images, dataset.train_labels, plan.batch_size, shuffle=True,
                         drop_last=True, device=device)
    generator = torch.Generator().manual_seed(args.seed)

    def batched_batches():
        for images, labels in loader:
            x = random_crop_flip(normalize(images, dataset.mean, dataset.std), PADDING, generator=generator)
            yield x.contiguous(memory_format=torch.channels_last), labels

    sources = {"batched_loader_crop_flip": batched_batches}
    for workers in args.worker_counts:
        samples = PerSampleCrops(dataset.train_images, dataset.train_labels, dataset.mean, dataset.std, PADDING)
        data_loader = torch.utils.data.DataLoader(
            samples, batch_size=plan.batch_size, shuffle=True, num_workers=workers, drop_last=True)
        sources[f"dataloader_w{workers}"] = lambda data_loader=data_loader: iter(data_loader)

    for name, make_batches in sources.items():
        timer = StepTimer(device)
        for _ in TimedBatches(make_batches(), timer, plan.steps_per_run):
            pass
        times = timer.durations()[plan.warmup:]
        summary = summarize(times)
        summary["images_per_second"] = plan.batch_size / summary["median_s"]
        results[name] = summary
    return results


# ---------------------------------------------------------------------------------------------
# main


def measure_model(args, name: str, device: torch.device, threads: int) -> dict:
    plan = ModelPlan(args, name)
    dataset = random_dataset(plan.batch_size * plan.steps_per_run, 64, seed=args.seed)
    variants, notes = build_variants(args, plan, dataset, device, threads)

    repeat_medians = {variant: [] for variant in variants}
    step_times = {variant: [] for variant in variants}
    for repeat in range(plan.repeats):
        for variant_name in rotated(list(variants), repeat):
            variant = variants[variant_name]
            torch.set_num_threads(variant.threads)
            times = variant.run(repeat)
            step_times[variant_name].extend(times)
            repeat_medians[variant_name].append(statistics.median(times))
            print(f"{name} repeat {repeat + 1}/{plan.repeats} {variant_name}: "
                  f"{plan.batch_size / repeat_medians[variant_name][-1]:.1f} images/s")
    torch.set_num_threads(threads)

    summaries = {}
    for variant_name, times in step_times.items():
        summary = summarize(times)
        summary["images_per_second"] = plan.batch_size / summary["median_s"]
        summary["threads"] = variants[variant_name].threads
        summaries[variant_name] = summary
    flops = count_step_flops(plan, dataset, device, args.seed)
    return {
        "batch_size": plan.batch_size,
        "timed_steps_per_repeat": plan.steps,
        "warmup_steps": plan.warmup,
        "repeats": plan.repeats,
        "variants": summaries,
        "step_median_per_repeat_s": repeat_medians,
        "notes": notes,
        "ratios": model_ratios(repeat_medians, args.worker_counts),
        "flops_per_step": flops,
        "achieved_flops_per_second": flops / summaries["trainer"]["median_s"],
        "pipeline": time_pipelines(args, plan, dataset, device),
    }


def paired(faster: list[float], slower: list[float]) -> dict:
    """Speed-up of ``faster`` over ``slower`` from per-repeat median step times: slower / faster."""
    ratios = [slow / fast for fast, slow in zip(faster, slower)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "per_repeat": ratios}


def model_ratios(medians: dict, worker_counts: list[int]) -> dict:
    trainer = medians["trainer"]
    loader_names = [f"dataloader_w{workers}" for workers in worker_counts]
    best_loader = [min(medians[name][repeat] for name in loader_names) for repeat in range(len(trainer))]
    ratios = {
        "trainer_over_plain": paired(trainer, medians["plain"]),
        "trainer_over_best_dataloader": paired(trainer, best_loader),
        "channels_last_speedup": paired(trainer, medians["trainer_contiguous"]),
    }
    if "trainer_1_thread" in medians:
        ratios["all_threads_over_1_thread"] = paired(trainer, medians["trainer_1_thread"])
    if "trainer_compile" in medians:
        ratios["compile_speedup"] = paired(medians["trainer_compile"], trainer)
    return ratios


def main() -> None:
    args = parse_args()
    device = pick_device()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    machine = machine_info(device)

    matmul_before = time_matmul(args.matmul_size, device, args.quick)
    models = {name: measure_model(args, name, device, threads) for name in args.model_names}
    matmul_after = time_matmul(args.matmul_size, device, args.quick)
    matmul = {"before": matmul_before, "after": matmul_after,
              "flops_per_second": max(matmul_before["flops_per_second"], matmul_after["flops_per_second"])}
    if device.type == "cuda":
        matmul["bf16"] = time_matmul(args.matmul_size, device, args.quick, dtype=torch.bfloat16)
    for result in models.values():
        result["achieved_fraction_of_matmul"] = result["achieved_flops_per_second"] / matmul["flops_per_second"]

    targets = {}
    for name, result in models.items():
        ratios = result["ratios"]
        targets[name] = {
            "trainer_over_plain_min": 0.98,
            "trainer_over_plain_met": ratios["trainer_over_plain"]["median"] >= 0.98,
            "trainer_over_best_dataloader_min": 2.0,
            "trainer_over_best_dataloader_met": ratios["trainer_over_best_dataloader"]["median"] >= 2.0,
        }
    payload = {
        "benchmark": "throughput",
        "quick": args.quick,
        "machine": machine,
        "command": command_line(),
        "threads": threads,
        "models": models,
        "matmul": matmul,
        "targets": targets,
    }
    write_result(result_path(args.out, "throughput", args.quick), payload)
    print_report(payload)


def print_report(payload: dict) -> None:
    for name, result in payload["models"].items():
        print(f"\n{name}, batch {result['batch_size']}")
        rows = [(variant, summary["images_per_second"], 1000 * summary["median_s"], summary["threads"], summary["count"])
                for variant, summary in result["variants"].items()]
        print_table(("variant", "images/s", "median step ms", "threads", "steps"), rows)
        rows = [(ratio, f"{value['median']:.3f}x (range {value['min']:.3f}-{value['max']:.3f})")
                for ratio, value in result["ratios"].items()]
        rows.append(("achieved FLOP/s", f"{result['achieved_flops_per_second'] / 1e9:.1f} G"))
        rows.append(("fraction of matmul FLOP/s", f"{result['achieved_fraction_of_matmul']:.3f}"))
        print_table(("quantity", "value"), rows)
        for variant, note in result["notes"].items():
            print(f"{variant}: {note}")
    matmul = payload["matmul"]
    print(f"\nfloat32 {matmul['before']['size']}x{matmul['before']['size']} matmul: "
          f"{matmul['flops_per_second'] / 1e9:.1f} GFLOP/s (fastest block before and after the models)")


if __name__ == "__main__":
    main()
