"""Does every method learn? Train each one at CPU scale, then read its encoder out next to the same
architecture at random init (same seed): k-NN (k = 20) and the linear probe for every method, and
for MAE also its paper's readout, fine-tuning from the MAE encoder vs from random init.

    python benchmarks/learning.py                                        # every method, seed 0, ~1 h on 2 cores
    python benchmarks/learning.py --seeds 0 1 2 --output-dir runs/learning
    python benchmarks/learning.py --methods simclr mae --steps-scale 0.05   # smoke run, a few minutes
    python benchmarks/learning.py --data /my/folder --methods byol        # any ImageFolder with train/ and val/

Each method trains through its own script, with the flags a user would type (printed before each
run); the random-init encoder is built in this process exactly as the script builds it
(torch.manual_seed(seed); module.build_model(args)) and saved in the project's checkpoint format,
and its k-NN must equal the script's logged epoch-0 k-NN (the same random encoder). Output in
--output-dir: results.json, results.md (the table, also printed) and knn_vs_step.png (needs
matplotlib, an optional extra of benchmarks/ only: without it the PNG is skipped with one line).

Gains are paired per seed (trained − random init of the same seed); "gain / std" divides the mean
gain by the std of the per-seed gains (n/a for one seed). The issue's bar: gain >= 5 points and
> 2 std on 3 seeds (MAE: fine-tune gain >= 3 points and > 2 std).
"""
import argparse
import concurrent.futures
import contextlib
import importlib
import json
import math
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import shapes  # noqa: E402

# ----------------------------------------------------------------------------- recipes
# Every method: vit_nano (width 128, 4 blocks, 4 heads), patch 8 at 32 px (16 patches + CLS), batch
# 64 on one CPU process. Heads keep their papers' shapes, widths scaled to a 128-wide encoder. The
# budget is in optimizer STEPS (epochs = round(steps / (N_train // 64))), set from the throughput
# measured on 1 thread of an idle core (images/s at these flags: SimCLR 220, MoCo v3 156, MoCo v2 252,
# BYOL 168, SimSiam 211, DINO 213 with its 2 crops (under load), MAE 329): about 61 min of training on one thread,
# plus readouts, so roughly an hour for one seed on 2 cores (an estimate: the full budget has not
# been run yet; benchmarks/results/ has what was measured, at --steps-scale 0.3).
# "warmup" is a share of the budget (turned into --warmup-epochs), as papers give it in epochs of a
# fixed schedule. Each change from the paper's recipe is justified on its line.
BACKBONE = {"arch": "vit_nano", "patch_size": 8, "batch_size": 64}  # batch 64: the CPU's size (papers 256-4096)
RECIPES = {
    "simclr": dict(script="simclr.py", steps=1500, warmup=0.1, flags={  # paper: 10 of 100 epochs warm-up
        "proj_hidden": 512,   # paper: hidden = encoder width (2048 for R-50); 4x the 128-wide ViT
        "proj_dim": 128,      # paper
        "temperature": 0.2,   # paper 0.1 at batch 4096; small batches prefer a softer τ (Table 5 trend; measured 0.2)
        "base_lr": 4,         # LARS lr 1 at batch 64 (measured: README quick start 28.6 -> 40.6%); 0.3 moves little
                              # in 1k steps
    }),
    "moco_v3": dict(script="moco.py", steps=1500, warmup=0.1, flags={  # paper: 40 of 300 epochs warm-up
        "version": "v3",
        "proj_hidden": 512,   # paper 4096 for ViT-S (384 wide); scaled with the encoder
        "proj_dim": 128,      # paper 256
        "temperature": 0.2,   # paper (ViT)
        "optimizer": "adamw",  # paper (ViT)
        "base_lr": 4e-3,      # AdamW lr 1e-3 at batch 64; the paper's 1.5e-4 x B/256 = 4e-5 barely moves in 1k steps
        "weight_decay": 0.1,  # paper
        "momentum": 0.99,     # paper's start value, cosine to 1: an EMA horizon of ~100 steps fits a 1k-step run
    }),
    "moco_v2": dict(script="moco.py", steps=1500, warmup=0.1, flags={  # paper: no warm-up (SGD); AdamW's as v3
        "version": "v2",
        "proj_hidden": 512,   # paper 2048 (R-50 width)
        "proj_dim": 128,      # paper
        "temperature": 0.2,   # paper
        "queue_size": 512,    # paper 65536 of 1.28M images (5%); 512 of 5000 keeps the queue this fresh (8 batches)
        "optimizer": "adamw",  # paper: SGD, for a ResNet-50; a ViT trains with AdamW (MoCo v3, DeiT). Linear gain,
                              # seed 0: SGD lr 0.25 -5.0 (lightly's MoCo v2 at the same settings: -3.0), lr 0.075 +6.6,
                              # AdamW +11.1
        "base_lr": 4e-3,      # AdamW lr 1e-3 at batch 64, as the MoCo v3 recipe above
        "weight_decay": 0.1,  # MoCo v3's for AdamW (the paper's 1e-4 is SGD's)
        "momentum": 0.99,     # paper 0.999 over 1M steps; a 1k-step run needs an EMA horizon of ~100 steps
    }),
    "byol": dict(script="byol.py", steps=1500, warmup=0.1, flags={  # paper: 10 of 1000 epochs warm-up
        "proj_hidden": 512,   # paper 4096 (2x R-50 width); 4x the 128-wide ViT
        "proj_dim": 128,      # paper 256
        "pred_hidden": 512,   # paper 4096
        "base_lr": 4,         # LARS lr 1 at batch 64 (measured on shapes: 2 and 8 did worse at 250 steps); paper 0.2
        "tau_base": 0.99,     # paper 0.996 over 300k steps; ~100-step EMA horizon for 1k steps (cosine to 1, as the
                              # paper)
    }),
    "simsiam": dict(script="simsiam.py", steps=1500, warmup=0.1, flags={  # paper: none at batch 512; here lr 0.25 from
        # step 0 made the gain a lottery (linear +23.0, +4.2, +9.2, seeds 0-2); one warm-up epoch: +11.3, +12.2, +10.1
        "proj_hidden": 512,   # paper 2048 (R-50 width)
        "proj_dim": 512,      # paper 2048 = hidden
        "pred_hidden": 128,   # paper: bottleneck 1/4 of proj_dim (512 of 2048)
        "base_lr": 1,         # SGD lr 0.25 at batch 64 (simsiam.py's CPU recipe); the paper's 0.05 moves nothing in
                              # 1k steps.
                              # 2 (lr 0.5, without warm-up, cosine per epoch) broke seed 2 (linear 31.6 -> 27.4)
        "weight_decay": 1e-4,  # paper
    }),
    "dino": dict(script="dino.py", steps=1500, warmup=0.1, flags={  # paper: 10 of 100 epochs warm-up
        "out_dim": 1024,      # paper 65536 for ImageNet's 1.28M images; small data wants 1-4k prototypes
        "head_hidden": 512,   # paper 2048
        "head_bottleneck": 128,  # paper 256
        "local_crops": 0,     # paper 8-10 local crops of 96 px; here they would be 16 px, 2x2 patches, often all
        "global_crops_scale": (0.14, 1),  # background: the paper's no-multi-crop views (2 crops, scale 0.14-1) learn
                              # more (k-NN 62.1 vs 47.3% with 6 local crops at 390 steps) at twice the speed
        "base_lr": 4e-3,      # AdamW lr 1e-3 at batch 64; the paper's 5e-4 x B/256 = 1.25e-4 is for 100+ epochs
        "teacher_temp": 0.04,  # paper's 100-epoch setting: 0.04 throughout ...
        "warmup_teacher_temp_epochs": 0,  # ... with no warm-up (paper's 30-epoch warm-up is for 300 epochs)
        "momentum_teacher": 0.99,  # paper 0.996 at batch 1024 over 125k steps; ~100-step horizon for 1k steps
        "freeze_last_layer": 0,  # paper 1 of 100 epochs (1%): less than a dozen steps here
    }),
    # Twice the others' steps: MAE's paper trains longest (800-1600 epochs; the others 100-1000) and its
    # fine-tuning gain still grows at 1600 (Fig. 7). At 2000 steps (x 0.3: 589 on 2000 images) its k-NN was still
    # below its random init's (27.6 vs 30.9%) and fine-tuning gained +4.0 +- 3.5; at 4000 (1209): 34.3%, +16.1 +- 1.2.
    "mae": dict(script="mae.py", steps=4000, warmup=0.05, flags={  # paper: 40 of 800 epochs warm-up
        "patch_size": 4,      # 64 patches, 16 visible (paper: 196, 49 visible). At patch 8 only 4 of 16 stay visible
                              # and MAE hurt fine-tuning vs its random init (49.2 vs 53.7%); at 4: 61.1 vs 47.1%
                              # (seed 0)
        "mask_ratio": 0.75,   # paper
        "decoder_dim": 64,    # paper 512 for a 1024-wide ViT-L: half the encoder width
        "decoder_depth": 2,   # paper 8; 2 of the encoder's 4 blocks
        "decoder_heads": 4,   # paper 16; head width 16
        "base_lr": 1.5e-3,    # AdamW lr 3.75e-4 at batch 64; paper 1.5e-4 x B/256 (for 800 epochs)
        "weight_decay": 0.05,  # paper
        "visualize": 0,       # no reconstruction PNGs in a benchmark
    }),
}
READOUTS = ("knn", "linear", "finetune")
# MAE's readout: probe.py's fine-tuning (its MAE recipe: layer decay, RandAugment, MixUp/CutMix, label
# smoothing), batch 64, from MAE and from random init alike, for a fixed 780 steps whatever --steps-scale
# (3 epochs told nothing: both encoders near chance). Base lr 5e-3 (lr 1.25e-3), not the paper's 5e-4 (for
# 100 epochs): measured after 624 MAE steps at patch 8, seed 0, 10 epochs, from MAE / from probe.py's own
# random init (--baselines): 5e-4 -> 18.6 / 20.0%, 1.5e-3 -> 30.0 / 20.4%, 5e-3 -> 49.2 / 17.2%. mae.py's own
# init (Xavier, sin-cos), which this benchmark compares with, fine-tunes far better at 5e-3: 53.7% (patch 8).
# The length is in steps, as the pre-training budgets: 780 = 10 epochs of 5000 labels; 10 epochs of 2000 labels
# (310 steps) left both encoders near 30% (MAE 28.1 vs random init 29.9, seed 0), a readout too short to tell.
FINETUNE_STEPS, FINETUNE_BASE_LR = 780, 5e-3


def finetune_epochs(data, args):
    return args.finetune_epochs or max(1, round(FINETUNE_STEPS / steps_per_epoch(data, BACKBONE["batch_size"])))


def flag_list(flags):
    out = []
    for name, value in flags.items():
        out += ["--" + name.replace("_", "-"), *map(str, value if isinstance(value, tuple) else [value])]
    return out


def steps_per_epoch(data, batch_size):
    size = shapes.spec(data)[1] if data.split(":")[0] == "shapes" else len(common.build_dataset(data, "pretrain"))
    return size // batch_size


def method_command(method, data, seed, steps_scale, output_dir, overrides=()):
    """(argv after `python`, steps, epochs) of one training run, as a user would type it. overrides:
    (name, value) pairs replacing a recipe's flags, or its "steps" / "warmup" (--set, for sweeps)."""
    recipe = dict(RECIPES[method], flags=dict(RECIPES[method]["flags"]))
    for name, value in overrides:
        if name in ("steps", "warmup"):
            try:
                recipe[name] = float(value)
            except (TypeError, ValueError):
                raise common.UserError(f"--set {name}={value}: {name} takes one number") from None
        else:
            recipe["flags"][name] = value
    per_epoch = steps_per_epoch(data, BACKBONE["batch_size"])
    if per_epoch < 1:
        raise common.UserError(f"--data {data}: fewer images than one batch of {BACKBONE['batch_size']}")
    epochs = max(1, round(recipe["steps"] * steps_scale / per_epoch))
    flags = dict(data=data, **{**BACKBONE, **recipe["flags"]}, epochs=epochs,  # a recipe may override the backbone
                 # at least one warm-up epoch where the paper has one: DINO without it lost 10 k-NN
                 # points at 390 steps (27.8 vs 47.3%, seed 0), the warm-up having rounded to 0
                 warmup_epochs=max(1, round(recipe["warmup"] * epochs)) if recipe["warmup"] else 0,
                 knn_every=max(1, epochs // 6),
                 seed=seed, workers=0, output_dir=output_dir)
    argv = [recipe["script"], *flag_list(flags)]
    if overrides:  # a flag the script lacks or a bad value: the script's own one-line argparse error, before any run
        importlib.import_module(recipe["script"][:-3]).get_args_parser().parse_args(argv[1:])
    return argv, epochs * per_epoch, epochs


# ----------------------------------------------------------------------------- readouts
def random_init_checkpoint(method, argv, path):
    """The encoder the script starts from, saved as the script saves a checkpoint: same flags, same
    seed, same build_model; DINO's is the teacher backbone (what its script evaluates and exports)."""
    module = importlib.import_module(argv[0][:-3])
    args = module.get_args_parser().parse_args(argv[1:])
    args.image_size = args.image_size or common.default_image_size(args.data)  # as main() does
    torch.manual_seed(args.seed)
    model = module.build_model(args)
    encoder = model.teacher.backbone if hasattr(model, "teacher") else model.encoder
    config = dict(arch=args.arch, image_size=args.image_size, patch_size=args.patch_size)
    common.save_checkpoint(dict(method=argv[0][:-3], encoder_config=config, encoder=encoder.state_dict(),
                                args=vars(args), epoch=0, step=0), path)


def knn_top1(checkpoint_path, data):
    """k-NN (k = 20) top-1 on the val split, exactly the scripts' monitor (common.knn_monitor)."""
    checkpoint = common.load_checkpoint(checkpoint_path)
    encoder = common.build_encoder(**checkpoint["encoder_config"])
    encoder.load_state_dict(checkpoint["encoder"])
    run = checkpoint.get("args", {})  # the run's normalisation, as its own monitor used
    args = argparse.Namespace(data=data, val="", image_size=checkpoint["encoder_config"]["image_size"],
                              data_root="data", workers=0,
                              mean=run.get("mean", common.IMAGENET_MEAN), std=run.get("std", common.IMAGENET_STD),
                              grayscale_input=run.get("grayscale_input", False), skip_bad_images=False)
    return 100 * common.knn_monitor(encoder, args, 64, common.DistEnv())


def top1(results, protocol):
    """probe.py's top-1 (%) for a protocol, whether it sits at results[protocol]['top1'] or deeper."""
    node = results.get(protocol, results)
    while isinstance(node, dict) and "top1" not in node and len(node) == 1:
        node = next(iter(node.values()))
    if not isinstance(node, dict) or "top1" not in node:
        raise RuntimeError(f"probe.py's output has no {protocol} top-1: {json.dumps(results)[:300]}")
    return float(node["top1"])


def probe_argv(checkpoint_path, data, protocol, output, args):
    argv = ["probe.py", checkpoint_path, "--data", data, "--protocol", protocol, "--seeds", "1",
            "--workers", "0", "--output", output]
    if protocol == "linear" and args.linear_epochs:
        argv += ["--linear-epochs", str(args.linear_epochs)]
    if protocol == "finetune":
        argv += ["--finetune-epochs", str(finetune_epochs(data, args)), "--finetune-batch-size", "64",
                 "--finetune-base-lr", str(FINETUNE_BASE_LR)]
    return argv


def probe(checkpoint_path, data, protocol, output, args):
    argv = probe_argv(checkpoint_path, data, protocol, output, args)
    # In this process (probe.py's own main, as its command line would run it): no second torch
    # import per readout, and the rendered shapes are cached.
    print("  $ python " + " ".join(argv), flush=True)
    module = importlib.import_module("probe")
    with open(os.path.splitext(output)[0] + ".log",
              "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        module.main(module.get_args_parser().parse_args(argv[1:]))
    with open(output) as f:
        return top1(json.load(f), protocol)


def run(argv, threads, log_path):
    """python ARGV from the repository root; stdout/stderr to LOG_PATH; seconds taken."""
    print("  $ python " + " ".join(argv), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    start = time.time()
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        tail = "".join(open(log_path).readlines()[-5:])
        raise RuntimeError(f"python {' '.join(argv[:2])}... failed (exit {result.returncode}), see {log_path}:\n{tail}")
    return time.time() - start


def benchmark_one(method, seed, args):
    """Train METHOD with SEED, then read out the trained and the random-init encoder."""
    out = os.path.abspath(os.path.join(args.output_dir, f"{method}_seed{seed}"))
    os.makedirs(out, exist_ok=True)
    argv, steps, epochs = method_command(method, args.data, seed, args.steps_scale, os.path.join(out, "train"),
                                         args.set)
    row_path = os.path.join(out, "row.json")
    if args.reuse and os.path.exists(row_path):
        with open(row_path) as f:
            row = json.load(f)
        if row["command"] == "python " + " ".join(argv):
            print(f"\n== {method}, seed {seed}: reused {row_path}", flush=True)
            return row
    for stale in ("log.jsonl", "checkpoint.pth"):  # a fresh run: the scripts would resume from these
        if os.path.exists(os.path.join(out, "train", stale)):
            os.remove(os.path.join(out, "train", stale))
    print(f"\n== {method}, seed {seed}: {steps} steps ({epochs} epochs)", flush=True)
    train_seconds = run(argv, args.threads, os.path.join(out, "train.log"))
    log = [json.loads(line) for line in open(os.path.join(out, "train", "log.jsonl"))]
    trained_path, init_path = os.path.join(out, "train", "checkpoint.pth"), os.path.join(out, "random_init.pth")
    random_init_checkpoint(method, argv, init_path)

    readout_start = time.time()
    row = dict(method=method, seed=seed, steps=steps, epochs=epochs, command="python " + " ".join(argv),
               train_seconds=round(train_seconds, 1),
               images_per_s=round(sum(r["images_per_s"] for r in log[1:]) / max(1, len(log) - 1), 1),
               knn_curve=[[r["epoch"] * steps // epochs, 100 * r["knn_top1"]] for r in log
                          if r.get("knn_top1") is not None],
               final_loss=log[-1].get("loss"))
    row["knn"] = dict(random_init=knn_top1(init_path, args.data), trained=knn_top1(trained_path, args.data))
    row["knn"]["logged_epoch0"] = 100 * log[0]["knn_top1"]  # the script's own random init: must be ours
    row["init_matches_log"] = abs(row["knn"]["random_init"] - row["knn"]["logged_epoch0"]) < 1e-6
    if not row["init_matches_log"]:
        print(f"WARNING: {method} seed {seed}: random-init k-NN {row['knn']['random_init']:.2f} "
              f"differs from the script's epoch-0 k-NN {row['knn']['logged_epoch0']:.2f}: "
              f"not the same random encoder", flush=True)
    protocols = ["linear"] + (["finetune"] if method == "mae" else [])
    encoders = (("random_init", init_path), ("trained", trained_path))
    for protocol in protocols:
        outputs = {name: os.path.join(out, f"{protocol}_{name}.json") for name, _ in encoders}
        if protocol == "finetune":
            # minutes each, mostly one thread's augmentations: both encoders side by side, each on half the threads
            # (at least one; what each computes does not depend on it running beside the other)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                runs = [pool.submit(run, probe_argv(path, args.data, protocol, outputs[name], args),
                                    max(1, args.threads // 2), os.path.splitext(outputs[name])[0] + ".log")
                        for name, path in encoders]
                for finished in runs:
                    finished.result()  # re-raises a failed fine-tune's error
            row[protocol] = {}
            for name, _ in encoders:
                with open(outputs[name]) as f:
                    row[protocol][name] = top1(json.load(f), protocol)
        else:
            row[protocol] = {name: probe(path, args.data, protocol, outputs[name], args) for name, path in encoders}
    row["readout_seconds"] = round(time.time() - readout_start, 1)
    for readout in ["knn", *protocols]:
        print(f"  {readout:<9} random init {row[readout]['random_init']:6.2f}  trained {row[readout]['trained']:6.2f}"
              f"  gain {row[readout]['trained'] - row[readout]['random_init']:+6.2f}", flush=True)
    with open(row_path, "w") as f:
        json.dump(row, f, indent=1)
    return row


# ----------------------------------------------------------------------------- report
def mean_std(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def summarize(rows):
    """Per method and readout: mean ± std of random init and trained over seeds, the paired gain,
    and the gain in units of the per-seed gains' std."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        entry = dict(seeds=[r["seed"] for r in runs], steps=runs[0]["steps"],
                     train_minutes=round(sum(r["train_seconds"] for r in runs) / len(runs) / 60, 2),
                     readouts={})
        for readout in READOUTS:
            if readout not in runs[0]:
                continue
            init, trained = ([r[readout][k] for r in runs] for k in ("random_init", "trained"))
            gain, gain_std = mean_std([t - i for t, i in zip(trained, init)])
            entry["readouts"][readout] = dict(
                random_init=mean_std(init), trained=mean_std(trained), gain=gain, gain_std=gain_std,
                gain_over_std=gain / gain_std if gain_std else None)
        summary[method] = entry
    return summary


def markdown(summary, rows, args):
    def cell(pair):
        mean, std = pair
        return f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")
    lines = [f"Data `{args.data}`, vit_nano/8, batch 64, seeds {' '.join(map(str, args.seeds))}, "
             f"steps × {args.steps_scale}, "
             f"{args.threads} thread(s). Top-1 %, mean ± std over seeds; gain paired per seed.", "",
             "| method | steps | train min | readout | random init | trained | gain | gain / std |",
             "|---|---|---|---|---|---|---|---|"]
    for method, entry in summary.items():
        for readout, r in entry["readouts"].items():
            ratio = f"{r['gain_over_std']:.1f}" if r["gain_over_std"] is not None else "n/a"
            lines.append(f"| {method} | {entry['steps']} | {entry['train_minutes']:.1f} | {readout} | "
                         f"{cell(r['random_init'])} | {cell(r['trained'])} | {r['gain']:+.1f} | {ratio} |")
    lines += ["", "| method | seed | steps | train s | img/s | "
              + " | ".join(f"{r} init → trained" for r in READOUTS) + " |",
              "|---" * (5 + len(READOUTS)) + "|"]
    for r in rows:
        cells = [f"{r[k]['random_init']:.1f} → {r[k]['trained']:.1f}" if k in r else "" for k in READOUTS]
        lines.append(f"| {r['method']} | {r['seed']} | {r['steps']} | {r['train_seconds']:.0f} | "
                     f"{r['images_per_s']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): knn_vs_step.png skipped")
        return None
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        for r in rows:
            if r["method"] == method:
                steps, knn = zip(*r["knn_curve"])
                ax.plot(steps, knn, marker="o", label=f"seed {r['seed']}")
        ax.set_title(method)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("k-NN top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def recipe_override(text):
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. base_lr=0.5), got {text!r}")
    return name.replace("-", "_"), tuple(value.split(",")) if "," in value else value  # 0.14,1: a flag of two values


def get_args_parser():
    p = argparse.ArgumentParser("learning.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--data", default="shapes:32:5000:2000",
                   help="shapes[:SIZE[:N[:V]]] or an ImageFolder with train/ and val/; 5k/2k: the size of the "
                        "held-out dataset the issue measured on, and 2000 val images put the k-NN's sampling error "
                        "at ±1 point")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiplies every method's step budget (0.05: smoke run)")
    p.add_argument("--set", nargs="+", default=[], type=recipe_override, metavar="NAME=VALUE",
                   help="sweeps: replace a recipe flag (base_lr=0.5, global_crops_scale=0.2,1) or its steps / "
                        "warmup share in every --methods run; the command in each row says what ran")
    p.add_argument("--linear-epochs", type=common.positive_int, default=None,
                   help="probe.py --linear-epochs (default: probe.py's)")
    p.add_argument("--finetune-epochs", type=common.positive_int, default=None,
                   help=f"MAE's fine-tuning readout (default: {FINETUNE_STEPS} steps' worth of epochs, 10 on 5000 "
                        "images; 3 epochs were too few to mean anything)")
    p.add_argument("--output-dir", default="runs/learning")
    p.add_argument("--threads", type=common.positive_int, default=2,
                   help="OMP threads of every training and probe process")
    p.add_argument("--reuse", action="store_true",
                   help="keep a method/seed whose OUTPUT_DIR row.json came from the same command")
    p.add_argument("--dry-run", action="store_true", help="print the training commands and exit")
    return p


def main(args):
    if not args.steps_scale > 0:
        raise common.UserError(f"--steps-scale must be positive, got {args.steps_scale}")
    torch.set_num_threads(args.threads)
    if args.dry_run:
        for method in args.methods:
            for seed in args.seeds:
                argv, steps, _ = method_command(method, args.data, seed, args.steps_scale,
                                                os.path.join(args.output_dir, f"{method}_seed{seed}", "train"),
                                                args.set)
                print(f"# {method} seed {seed}: {steps} steps\npython " + " ".join(argv))
        return None
    args.output_dir = os.path.abspath(args.output_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    os.chdir(ROOT)  # as the scripts run: --data-root's default "data" is the same folder for all of them
    start, rows = time.time(), []
    for method in args.methods:
        for seed in args.seeds:
            rows.append(benchmark_one(method, seed, args))
    summary = summarize(rows)
    report = dict(data=args.data, seeds=args.seeds, steps_scale=args.steps_scale, threads=args.threads,
                  backbone=BACKBONE, torch=torch.__version__, wall_minutes=round((time.time() - start) / 60, 1),
                  summary=summary, runs=rows)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    report["run_minutes"] = round(sum(r["train_seconds"] + r["readout_seconds"] for r in rows) / 60, 1)
    table = markdown(summary, rows, args) + (f"\nTime: {report['run_minutes']} min of training and readouts "
                                             f"(this invocation {report['wall_minutes']} min; "
                                             f"--reuse keeps earlier runs).\n")
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table)
    print("\n" + table)
    plot(rows, os.path.join(args.output_dir, "knn_vs_step.png"))
    print(f"results in {args.output_dir}/results.json and results.md")
    return report


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except common.UserError as error:
        sys.exit(f"learning.py: error: {error}")
