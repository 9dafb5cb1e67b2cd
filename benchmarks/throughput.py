"""Training throughput of every method: images/s, views/s, peak memory and MFU.

One step here is what a method's training loop does per batch: its own training_step (forward,
loss), backward, an optimizer step and, where the method has one, the momentum update. FLOPs are
counted with torch.utils.flop_counter on that real step (matmuls and convolutions, forward and
backward) and MFU is achieved FLOP/s over the GPU's dense bf16 peak. Three input modes:

    synthetic   views already on the GPU: what the model alone can do
    device      the in-memory dataset augmented on the GPU (common.DeviceLoader, the default path)
    dataloader  torchvision augmentation in DataLoader workers (--cpu-augment in the scripts)

    python benchmarks/throughput.py                                   # every config, on one GPU
    python benchmarks/throughput.py --configs resnet18-32 --methods byol simclr --modes synthetic device
    python benchmarks/throughput.py --configs cpu-tiny --steps 3     # CPU smoke run (the test)
    python benchmarks/throughput.py --configs resnet18-32 --augment-compile  # augment_batch alone: eager vs compiled

The optimizer is each method's paper choice (LARS, SGD or AdamW) with placeholder hyper-parameters:
its cost, not its schedule, is what matters here.
"""
import argparse
import contextlib
import importlib
import json
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

# Method -> its paper's optimizer. The views are the method's own (module.augmentations): two views,
# BYOL's asymmetric pair, MAE's single light view, DINO's 2 global + 10 local crops.
METHODS = {"simclr": "lars", "moco": "adamw", "byol": "lars", "simsiam": "sgd", "mae": "adamw", "dino": "adamw"}
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


def make_optimizer(kind, model, device):
    groups = common.param_groups(model, 1e-6)
    if kind == "lars":
        return common.LARS(groups, lr=0.1)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(groups, lr=1e-4, fused=device.type == "cuda")


def parse_method_args(module, config_name):
    """The method's flags at this config: its defaults, the config's model and size, cpu-tiny's small heads."""
    arch, size, patch, _, _ = CONFIGS[config_name]
    return module.get_args_parser().parse_args(
        ["--data", f"shapes:{size}", "--arch", arch, "--image-size", str(size), "--patch-size", str(patch),
         *(TINY_HEADS[module.__name__] if config_name == "cpu-tiny" else [])])


def batches(mode, views, config, args, dist_env):
    """An endless iterator of per-step view lists in the requested input mode."""
    arch, size, _, batch, _ = config
    if mode == "synthetic":
        shapes = [(batch, 3, view.size, view.size) for view in views.transforms]
        fixed = [torch.randn(shape, device=dist_env.device) for shape in shapes]
        while True:
            yield fixed
    num_images = max(2 * batch, batch * (args.steps + args.warmup) // 4)  # several epochs: loaders restart
    dataset = common.build_dataset(f"shapes:{size}:{num_images}", "pretrain", views)
    loader = common.make_loader(dataset, batch, dist_env, args.workers, on_device=mode == "device")
    while True:
        for batch_views, _ in loader:
            yield [v.to(dist_env.device, non_blocking=True) for v in batch_views]


def benchmark(method, config_name, mode, args, dist_env):
    arch, size, _, batch, _ = config = CONFIGS[config_name]
    device = dist_env.device
    module = importlib.import_module(method)
    method_args = parse_method_args(module, config_name)
    torch.manual_seed(0)
    model = module.build_model(method_args).to(device)
    resnet = arch.startswith("resnet") and device.type == "cuda"
    if resnet:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(METHODS[method], model, device)
    step_model = torch.compile(model) if args.compile else model
    views = module.augmentations(method_args)
    inputs = batches(mode, views, config, args, dist_env)

    def step(count_flops=False):
        batch_views = next(inputs)
        if resnet:
            batch_views = [v.contiguous(memory_format=torch.channels_last) for v in batch_views]
        counter = FlopCounterMode(display=False)
        with counter if count_flops else contextlib.nullcontext():
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = module.training_step(step_model, batch_views, method_args)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        if hasattr(module, "momentum_update"):
            module.momentum_update(model, 0.996)
        return counter.get_total_flops() if count_flops else None

    model.train()
    flops_per_step = step(count_flops=True)  # one step under the counter (also a warm-up step)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in torch.cuda.get_device_name()), None) \
        if device.type == "cuda" else None
    return dict(
        method=method, config=config_name, mode=mode, arch=arch, image_size=size, batch=batch,
        views=len(views.transforms), compile=args.compile, step_ms=1000 * seconds,
        images_per_s=batch / seconds, views_per_s=batch * len(views.transforms) / seconds,
        gflops_per_image=flops_per_step / batch / 1e9, tflops_per_s=flops_per_step / seconds / 1e12,
        mfu=flops_per_step / seconds / peak if peak else None,
        peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


def augment_timing(method, config_name, args, dist_env):
    """augment_batch alone on one uint8 batch, every view of the method, eager and torch.compile'd (static shapes:
    one graph per distinct View, its chains of elementwise kernels fused); ms per batch, all views."""
    _, size, _, batch, _ = CONFIGS[config_name]
    module = importlib.import_module(method)
    views = module.augmentations(parse_method_args(module, config_name)).transforms
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dist_env.device)
    synchronize = torch.cuda.synchronize if dist_env.device.type == "cuda" else lambda: None
    timings = {}
    for name, augment in ("eager", common.augment_batch), ("compiled", torch.compile(common.augment_batch,
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
    p.add_argument("--modes", nargs="+", default=["synthetic", "device", "dataloader"],
                   choices=["synthetic", "device", "dataloader"], help="input pipelines to measure")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotuning, compilation)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count()), help="DataLoader workers (dataloader mode)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--augment-compile", action="store_true", help="time augment_batch alone instead, eager vs "
                   "torch.compile'd (static shapes), per method and config (on CPU: inductor compiles for minutes)")
    p.add_argument("--output", default="benchmarks/throughput.json", help="JSON results")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        sys.exit("throughput.py: error: --steps must be >= 1 and --warmup >= 0")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    dist_env = common.DistEnv(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if dist_env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
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
