"""Time one method file: the loader alone, the augmentation alone (ours, batched, against
torchvision per sample), the device step, the run end to end, model FLOPs and peak memory. Numbers
are printed, never asserted.

    python benchmark.py byol                                   # any method: byol, ladder_byol, ...
    python benchmark.py ladder_byol --batch-size 64            # then that method's own flags
    python benchmark.py byol --device cpu --image-size 64 --batch-size 32
    torchrun --nproc_per_node=8 benchmark.py byol --data /path/to/imagenet --preset imagenet
    python benchmark.py byol --help                            # byol.py's flags

The first argument names the method file. Its Config and PRESETS parse the other flags and its
check_config checks them, as in its main(); the timed runs are its own train(), on derived configs
(a few steps, no kNN, checkpoints under <out>/benchmark): random uint8 batches made on the device
for the device step (DeviceBatches), the configured --data end to end. On a CPU the device step
runs twice, in fp32 and in bf16 (--precision), side by side: bf16 pays off only on CPUs with native
bf16 (AVX512-BF16, AMX); elsewhere it is emulated, and slower.
"""

import contextlib
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

import torch

import common
from common import print0

METHODS = ("byol", "ladder_byol", "dense_byol", "densesiam", "lewel", "mcl")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16: model-FLOP utilisation


def median_rate(fn, images_per_call, warmup, windows, calls_per_window, device):
    """Images per second of fn() (images_per_call each): the median over `windows` timed windows."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(windows):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls_per_window):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(images_per_call * calls_per_window / (time.perf_counter() - start))
    return sorted(rates)[len(rates) // 2]


def torchvision_pipeline(recipe, size):
    """The per-sample torchvision pipeline equivalent to `recipe` (what DataLoader workers would
    run per image)."""
    import torchvision.transforms.v2 as T

    bicubic = recipe.interpolation == "bicubic"
    mode = T.InterpolationMode.BICUBIC if bicubic else T.InterpolationMode.BILINEAR
    b, c, s, h = recipe.jitter
    blur = T.GaussianBlur(common.blur_kernel_size(size), sigma=recipe.blur_sigma)
    return T.Compose([
        T.RandomResizedCrop(size, scale=recipe.crop_scale, ratio=recipe.crop_ratio,
                            interpolation=mode, antialias=True),
        T.RandomHorizontalFlip(recipe.flip_p),
        T.RandomApply([T.ColorJitter(b, c, s, h)], p=recipe.jitter_p),
        T.RandomGrayscale(recipe.gray_p),
        T.RandomApply([blur], p=recipe.blur_p),
        T.RandomSolarize(128, p=recipe.solarize_p),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD),
    ])


class DeviceBatches:
    """The device step's input: a few random uint8 batches made on the device, served in turn.
    Timing needs no real images, and no dataset in memory: the built-in set for the 26 global
    batches of an ImageNet-preset device step would be about 100k images per process."""

    def __init__(self, batches, batch_per_rank, size, device, seed, pool=4):
        generator = torch.Generator(device=device).manual_seed(seed)
        self.pool = [torch.randint(0, 256, (batch_per_rank, 3, size, size), generator=generator,
                                   device=device, dtype=torch.uint8) for _ in range(pool)]
        self.labels = torch.zeros(batch_per_rank, dtype=torch.long, device=device)
        self.batches, self.start = batches, 0

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __len__(self):
        return self.batches

    def __iter__(self):
        for index in range(self.start, self.batches):
            yield self.pool[index % len(self.pool)], self.labels


@contextlib.contextmanager
def device_batches(batches, cfg, dist):
    """Within the block the method's train() gets DeviceBatches from common.make_loaders (no kNN
    sets: the timed runs stop before any kNN)."""
    make_loaders = common.make_loaders
    common.make_loaders = lambda run_cfg, run_dist: (DeviceBatches(
        batches, cfg.batch_size // dist.world_size, cfg.image_size, dist.device,
        cfg.seed + dist.rank), None, None)
    try:
        yield
    finally:
        common.make_loaders = make_loaders


def run_benchmark(train_fn, cfg, dist, steps=20, warmup=5, window=5):
    """Time one method: loader alone, augmentation alone (ours vs torchvision per sample), device
    step, end to end. Returns {row: value} and prints them as one table.

    train_fn(cfg, dist) is the method's own train(). Each timed run logs every `window` steps for
    about warmup + steps steps; the first window (warm-up, compile) is dropped and the median rate
    of the others kept.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = dist.device
    per_rank = cfg.batch_size // dist.world_size
    out = Path(cfg.out) / "benchmark"
    results = {}
    # (1) loader alone
    loader = common.make_loaders(cfg, dist)[0]
    start, count = time.perf_counter(), 0
    for index, (images, _) in enumerate(loader):
        if index == warmup:
            start, count = time.perf_counter(), 0
        count += images.shape[0]
        if index >= warmup + steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    results["loader alone"] = count / max(time.perf_counter() - start, 1e-9)
    # (2) augmentation alone: two BYOL views per image, batched on the device vs torchvision per
    # sample (--compile: the compiled jitter ops, compiled during the warm-up calls)
    images = next(iter(loader))[0]
    generator = torch.Generator(device=device).manual_seed(0)
    two_views = lambda: [common.augment(images, recipe, cfg.image_size, generator)
                         for recipe in common.BYOL_VIEWS]
    common.compile_colour_ops(cfg.compile)
    results["augmentation, batched (ours)"] = median_rate(two_views, len(images), 2, 5, 2, device)
    pipelines = [torchvision_pipeline(recipe, cfg.image_size) for recipe in common.BYOL_VIEWS]
    cpu_images = images[:min(64, images.shape[0])].cpu()
    per_sample = lambda: [pipe(image) for image in cpu_images for pipe in pipelines]
    results["augmentation, torchvision per sample (1 process)"] = median_rate(
        per_sample, cpu_images.shape[0], 1, 3, 1, torch.device("cpu"))
    # (3) device step on device-resident synthetic data (augmentation included): on a CPU in fp32
    # and in bf16; (4) end to end on cfg.data. The method's own loop, logging every `window` steps.
    base = dict(knn_every=0, log_every=window, ckpt_every_steps=0, keep_every=0, resume=False,
                stop_after=window * (1 + max(steps // window, 1)))
    on_device = lambda: device_batches(base["stop_after"] + 1, cfg, dist)
    if device.type == "cuda":
        runs = [("device step (synthetic data on device)", {}, on_device)]
    else:
        runs = [(f"device step, {precision} (synthetic data on device)", dict(precision=precision),
                 on_device) for precision in ("fp32", "bf16")]
    if cfg.data != "synthetic":
        runs.append((f"end to end ({cfg.data})", {}, contextlib.nullcontext))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for label, change, data in runs:
        run_cfg = dataclasses.replace(cfg, out=str(out), **base, **change)
        metrics = out / "metrics.jsonl"
        if dist.is_main and metrics.exists():
            metrics.unlink()
        common.barrier()
        with data():
            train_fn(run_cfg, dist)
        if dist.is_main:
            records = [json.loads(line) for line in open(metrics) if "images_per_s" in line][1:]
            middle = len(records) // 2
            results[label] = sorted(record["images_per_s"] for record in records)[middle]
            results[f"  data-wait fraction, {label.split(' (')[0]}"] = sorted(
                record["data_wait"] for record in records)[middle]
    if device.type == "cuda":
        results["peak memory (GiB)"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        import resource

        results["peak memory (GiB, process RSS)"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    # model FLOPs per image from one counted step
    flop_cfg = dataclasses.replace(cfg, out=str(out), **dict(base, stop_after=1))
    with device_batches(2, cfg, dist), FlopCounterMode(display=False) as counter:
        train_fn(flop_cfg, dist)
    flops_per_image = counter.get_total_flops() / per_rank
    results["GFLOP per image (counted, one step)"] = flops_per_image / 1e9
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((value for key, value in PEAK_TFLOPS.items() if key in name), None)
    step_rate = results.get("device step (synthetic data on device)", 0.0) / dist.world_size
    if peak:
        utilisation = flops_per_image * step_rate / (peak * 1e12)
        results["model-FLOP utilisation (device step)"] = utilisation
    precision = common.describe_precision(device, cfg.precision)
    print0(f"\nbenchmark: {name} x{dist.world_size}, {cfg.arch}/{cfg.stem}, {cfg.image_size} px, "
           f"global batch {cfg.batch_size}, precision {precision}, torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads")
    for key, value in results.items():
        plain = any(word in key for word in ("GiB", "GFLOP", "utilisation", "fraction"))
        print0(f"  {key:<52} {value:12.2f}{'' if plain else ' images/s'}")
    speed_ups = {"augmentation speed-up (batched / per sample)": (
        "augmentation, batched (ours)", "augmentation, torchvision per sample (1 process)")}
    if device.type != "cuda":
        speed_ups["device step speed-up (bf16 / fp32)"] = tuple(
            f"device step, {dtype} (synthetic data on device)" for dtype in ("bf16", "fp32"))
    for label, (faster, slower) in speed_ups.items():
        if faster in results:  # rank 0 holds the timed runs' rates
            print0(f"  {label:<52} {results[faster] / results[slower]:12.2f}x")
    return results


def main(argv=None, steps=20, warmup=5, window=5):
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"python benchmark.py {{{','.join(METHODS)}}} [that method's flags]"
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: {usage}\n\n{__doc__.strip()}")
        return None
    if not argv or argv[0] not in METHODS:
        named = f"{argv[0]!r} is not a method file" if argv else "name the method to time"
        common.die(f"{named}: {usage}")
    method = importlib.import_module(argv[0])
    with common.main_errors():  # bad input: one line, exit 2; training failure: exit 3
        cfg = common.parse_config(method.Config, method.PRESETS, argv[1:])
        task = getattr(cfg, "task", "pretrain")  # densesiam.py's --task seg has a loop of its own
        common.check(task == "pretrain", f"benchmark.py times pretraining, not --task {task}")
        dist = common.setup_distributed(cfg.device or None)
        method.check_config(cfg, dist.world_size)
        return run_benchmark(method.train, cfg, dist, steps, warmup, window)


if __name__ == "__main__":
    main()
