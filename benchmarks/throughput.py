"""Training throughput of every method: images/s, views/s, peak memory and MFU.

What is timed is each script's own main() on the built-in shapes data, one epoch: its views and loader, the run
harness (host reads every --log-every steps, SyncBN where the script chooses it, its DDP and compile settings) and
its step (forward, loss, backward, optimizer, schedules, EMA / queue / centre): the images/s a user's run reaches.
The last --steps steps are timed, after --warmup steps and one step whose FLOPs torch.utils.flop_counter counts
(matmuls, convolutions and attention, forward and backward, from training_step to the harness's step_done: the
augmentation is not counted). MFU is achieved FLOP/s over the GPU's dense bf16 peak. Two input modes:

    device      the in-memory dataset augmented on the GPU (device_views.DeviceLoader, the scripts' default)
    dataloader  torchvision augmentation in DataLoader workers (--cpu-augment in the scripts)

    python benchmarks/throughput.py                                   # every config, on one GPU
    python benchmarks/throughput.py --configs resnet18-32 --methods byol simclr --modes device
    python benchmarks/throughput.py --configs cpu-tiny --steps 3     # CPU smoke run (the test)
    python benchmarks/throughput.py --configs resnet18-32 --augment-compile  # augment_batch alone: eager vs compiled

The scripts' own optimizers and lr rules run; their schedules start at step 0 of a one-epoch run.
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import device_views  # noqa: E402

METHODS = ["simclr", "moco", "byol", "simsiam", "mae", "dino"]
# name -> (arch, image size, patch size, per-GPU batch, methods)
CONFIGS = {
    "resnet18-32": ("resnet18", 32, 16, 512, ("simclr", "moco", "byol", "simsiam")),
    "resnet50-224": ("resnet50", 224, 16, 128, ("simclr", "moco", "byol", "simsiam")),
    "vit_small-224": ("vit_small", 224, 16, 128, ("moco", "dino", "simclr")),
    "vit_base-224": ("vit_base", 224, 16, 256, ("mae",)),
    "cpu-tiny": ("vit_nano", 32, 8, 16, tuple(METHODS)),
}
# cpu-tiny only: heads shrunk to the backbone's scale, so that the CPU smoke run takes seconds.
TINY_HEADS = {"simclr": ["--proj-hidden", "256"], "moco": ["--proj-hidden", "256"],
              "byol": ["--proj-hidden", "256", "--pred-hidden", "256"],
              "simsiam": ["--proj-hidden", "256", "--pred-hidden", "64"],
              "mae": ["--decoder-dim", "64", "--decoder-depth", "1", "--decoder-heads", "4"],
              "dino": ["--out-dim", "1024", "--head-hidden", "256", "--head-bottleneck", "64"]}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12}  # dense


def parse_method_args(module, config_name):
    """The method's flags at this config: its defaults, the config's model and size, cpu-tiny's small heads."""
    arch, size, patch, _, _ = CONFIGS[config_name]
    return module.get_args_parser().parse_args(
        ["--data", f"shapes:{size}", "--arch", arch, "--image-size", str(size), "--patch-size", str(patch),
         *(TINY_HEADS[module.__name__] if config_name == "cpu-tiny" else [])])


def benchmark(method, config_name, mode, args, dist_env):
    arch, size, patch, batch, _ = CONFIGS[config_name]
    device, module, steps = dist_env.device, importlib.import_module(method), 1 + args.warmup + args.steps
    cuda = device.type == "cuda"
    flags = ["--data", f"shapes:{size}:{batch * steps}", "--arch", arch, "--image-size", str(size), "--patch-size",
             str(patch), "--batch-size", str(batch), "--epochs", "1", "--warmup-epochs", "0", "--knn-every", "0",
             "--workers", str(args.workers), "--log-every", str(args.log_every),
             *(["--cpu-augment"] if mode == "dataloader" else []), *(["--compile"] if args.compile else []),
             *dict(mae=["--visualize", "0"], dino=["--attention-maps", "0"]).get(method, []),
             *(TINY_HEADS[method] if config_name == "cpu-tiny" else [])]
    times, counter = [], FlopCounterMode(display=False)
    real_training_step, real_step_done = module.training_step, common.Run.step_done

    def training_step(*a, **k):
        if len(times) == 0:  # the first step's FLOPs
            counter.__enter__()
        return real_training_step(*a, **k)

    def step_done(run, *a, **k):
        real_step_done(run, *a, **k)
        if len(times) == 0:
            counter.__exit__(None, None, None)
        if cuda and len(times) in (args.warmup, steps - 1):  # the timed steps start and end with the GPU idle
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats() if len(times) == args.warmup else None
        times.append(time.perf_counter())

    module.training_step, common.Run.step_done = training_step, step_done
    try:
        with (tempfile.TemporaryDirectory() as output_dir, contextlib.redirect_stdout(io.StringIO()),
              contextlib.redirect_stderr(io.StringIO())):  # the run's own lines and progress bar
            method_args = module.get_args_parser().parse_args(flags + ["--output-dir", output_dir])
            views = len(module.augmentations(method_args).transforms)
            module.main(method_args)
    finally:
        module.training_step, common.Run.step_done = real_training_step, real_step_done
    seconds = (times[-1] - times[args.warmup]) / args.steps
    flops_per_step = counter.get_total_flops()
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in torch.cuda.get_device_name()), None) \
        if cuda else None
    return dict(
        method=method, config=config_name, mode=mode, arch=arch, image_size=size, batch=batch, views=views,
        compile=args.compile, step_ms=1000 * seconds, images_per_s=batch / seconds, views_per_s=batch * views / seconds,
        gflops_per_image=flops_per_step / batch / 1e9, tflops_per_s=flops_per_step / seconds / 1e12,
        mfu=flops_per_step / seconds / peak if peak else None,
        peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def augment_timing(method, config_name, args, dist_env):
    """augment_batch alone on one uint8 batch, every view of the method, eager and torch.compile'd (static shapes:
    one graph per distinct View, its chains of elementwise kernels fused); ms per batch, all views."""
    _, size, _, batch, _ = CONFIGS[config_name]
    module = importlib.import_module(method)
    views = module.augmentations(parse_method_args(module, config_name)).transforms
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dist_env.device)
    synchronize = torch.cuda.synchronize if dist_env.device.type == "cuda" else lambda: None
    timings = {}
    for name, augment in ("eager", device_views.augment_batch), ("compiled", torch.compile(device_views.augment_batch,
                                                                                    dynamic=False)):
        for step in range(1 + args.warmup + args.steps):  # the first call compiles
            if step == 1 + args.warmup:
                synchronize()
                start = time.perf_counter()
            for view in views:
                augment(images, view)
        synchronize()
        timings[f"{name}_ms"] = 1000 * (time.perf_counter() - start) / args.steps
    return dict(method=method, config=config_name, batch=batch, views=len(views), **timings)


def main():
    p = argparse.ArgumentParser("throughput.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c != "cpu-tiny"], choices=CONFIGS,
                   help="architecture / resolution / batch configurations")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods (each config lists where it applies)")
    p.add_argument("--modes", nargs="+", default=["device", "dataloader"], choices=["device", "dataloader"],
                   help="input pipelines to measure")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotuning, compilation)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count()), help="DataLoader workers (dataloader mode)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the scripts' --compile)")
    p.add_argument("--log-every", type=int, default=50, help="the scripts' --log-every (host reads every N steps)")
    p.add_argument("--augment-compile", action="store_true", help="time augment_batch alone instead, eager vs "
                   "torch.compile'd (static shapes), per method and config (on CPU: inductor compiles for minutes)")
    p.add_argument("--output", default="benchmarks/throughput.json", help="JSON results")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        sys.exit("throughput.py: error: --steps must be >= 1 and --warmup >= 0")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    dist_env = common.DistEnv(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device_name = torch.cuda.get_device_name() if dist_env.device.type == "cuda" else "CPU"
    print(f"device: {device_name}, torch {torch.__version__}")
    if args.augment_compile:
        results = [augment_timing(method, config, args, dist_env) for config in args.configs
                   for method in args.methods if method in CONFIGS[config][4]]
        for r in results:
            print(f"augment_batch {r['method']:8} {r['config']:14} {r['views']} views of {r['batch']}: eager "
                  f"{r['eager_ms']:.1f} ms, compiled {r['compiled_ms']:.1f} ms", flush=True)
        with open(args.output, "w") as f:
            json.dump(dict(device=device_name, torch=torch.__version__, augment=results), f, indent=1)
        return
    header = (f"{'method':8} {'config':14} {'mode':10} {'img/s':>9} {'views/s':>9} {'ms/step':>8} "
              f"{'GFLOP/img':>9} {'TFLOP/s':>8} {'MFU':>6} {'mem GB':>7}")
    print(header)
    results = []
    for config in args.configs:
        for method in (m for m in args.methods if m in CONFIGS[config][4]):
            for mode in args.modes:
                try:
                    r = benchmark(method, config, mode, args, dist_env)
                except torch.cuda.OutOfMemoryError:
                    print(f"{method:8} {config:14} {mode:10} out of memory")
                    torch.cuda.empty_cache()
                    continue
                results.append(r)
                mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "    -"
                memory = f"{r['peak_memory_gb']:7.1f}" if r["peak_memory_gb"] is not None else "      -"
                print(f"{method:8} {config:14} {mode:10} {r['images_per_s']:9.0f} {r['views_per_s']:9.0f} "
                      f"{r['step_ms']:8.1f} {r['gflops_per_image']:9.2f} {r['tflops_per_s']:8.2f} {mfu} {memory}",
                      flush=True)
    with open(args.output, "w") as f:
        json.dump(dict(device=device_name, torch=torch.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    main()
