"""How good is a saved encoder, did its pre-training help, and does it beat a public backbone? k-NN, linear probe and
fine-tuning on labelled data, mean ± std over seeds, at one or several label budgets, printed as each protocol ends and
written as JSON (the protocols and their costs: README). A test/ split is scored apart, never used for a choice.

    python probe.py runs/simclr/checkpoint.pth --data shapes --protocol all --baselines
    python probe.py runs/dino/checkpoint.pth --data DIR --compare dinov2_vits14.pth:vit_small --label-fraction 0.01 1
    python probe.py resnet50.pth --arch resnet50 --data /imagenet --protocol linear   # plain state_dict
    torchrun --nproc_per_node=8 probe.py runs/dino/checkpoint.pth --data /imagenet --n-last-blocks 4 --augment
    torchrun --nproc_per_node=8 probe.py runs/mae/checkpoint.pth --data /imagenet --protocol finetune
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2
from tqdm import tqdm

import common
import weights


def get_args_parser():
    p = argparse.ArgumentParser("probe.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    weights.encoder_args(p)
    add, i, f = p.add_argument, common.positive_int, float
    add("--data", required=True, help="shapes[:SIZE[:N[:V]]], cifar10, cifar100, stl10, or DIR/{train,val}/<class>")
    add("--data-root", default="data", help="where torchvision datasets are downloaded")
    add("--protocol", nargs="+", default=["all"], choices=["knn", "linear", "finetune", "all"], help="one or more "
        "(costs, in passes over the train split: knn, linear 1; linear --augment epochs x seeds; finetune ~3 x that)")
    add("--baselines", action="store_true", help="also at random init, and fine-tuned from scratch (2x the cost)")
    for name, views in [("flip", "horizontal flips"), ("color", "RandAugment's colour ops"),
                        ("vflip", "vertical flips"), ("rot90", "random quarter turns")]:  # --no-X turns one off
        add(f"--{name}", action=argparse.BooleanOptionalAction, help=f"{views} in the training views of linear "
            f"--augment and fine-tuning (default: as the run did)")
    add("--label-fraction", type=common.argparse_type("fraction", f, lambda x: 0 < x <= 1), nargs="+", default=None,
        help="shares of the training labels per class in (0, 1], a row each: the label-efficiency curve (e.g. 0.01 0.1 "
        "1; default 1 unless --labels-per-class)")
    add("--labels-per-class", type=i, nargs="+", default=[], help="N labelled images of each class, a row each "
        "(e.g. 1 5 25; all of a class that has fewer)")
    add("--compare", nargs="+", default=[], metavar="FILE[:ARCH]", help="other backbones (DINOv2, a supervised "
        "ResNet; ARCH: a plain state_dict's) on the same label subsets and seeds: differences paired by seed")
    add("--seeds", type=i, default=3, help="repeats, each its own label subset (k-NN: 1 with all labels): mean ± std")
    add("--output", default=None, type=common.argparse_type("json_file", str, lambda path: path.endswith(".json")),
        help="the .json (default: by the checkpoint, named by data, protocols, fraction); never a checkpoint's name")
    add("--save", default=None, help="keep seed 0's linear head and fine-tuned model in this folder (linear.pth, "
        "finetune.pth: the classes, the readout, the pixels): embed.py --head FILE predicts with them")
    add("--plot", default=None, choices=["pca", "tsne"], help="a 2-D map of the val features by label and the "
        "confusion matrix of seed 0's linear head or fine-tuned model, by the JSON (needs matplotlib; tsne: sklearn)")
    add = p.add_argument_group("k-NN").add_argument
    add("--k", type=i, nargs="+", default=[10, 20, 100, 200], help="neighbours (above the images per class: skipped)")
    add("--knn-temperature", type=common.positive_float, default=0.07, help="T in the exp(s/T) vote")
    add = p.add_argument_group("linear").add_argument
    add("--linear-epochs", type=i, default=100, help="DINO: 100; MAE: 90")
    add("--linear-batch-size", type=i, default=None, help="global; default 1024 (DINO), at most a tenth of the labels")
    add("--linear-lr", type=f, default=None, help="SGD lr; default: chosen from 0.01-3 on held-out training labels")
    add("--no-linear-bn", action="store_true", help="no BatchNorm (no affine) before the classifier (as DINO)")
    add("--augment", action="store_true", help="train on crop + flip views, not cached centre crops (official evals)")
    add = p.add_argument_group("fine-tune").add_argument
    add("--recipe", default=None, choices=["mae", "plain"], help="mae (ViT default: global pool + fc_norm, RandAugment "
        "m9 n2, random erasing 0.25, MixUp 0.8 / CutMix 1.0), plain (ResNet default: crop + flip)")
    add("--finetune-epochs", type=i, default=100, help="MAE: 100 for ViT-B, 50 for ViT-L")
    add("--finetune-batch-size", type=i, default=None, help="global; default 1024 (MAE), at most a tenth of the labels")
    add("--finetune-base-lr", type=f, default=5e-4, help="AdamW lr = base × batch / 256 (MAE); raise it for a few "
        "thousand labels (1000 shapes images: 30 epochs at 5e-4 stayed at chance, 20 at 5e-3 learned)")
    add("--finetune-weight-decay", type=f, default=0.05, help="AdamW weight decay (MAE)")
    add("--finetune-warmup-epochs", type=common.non_negative_int, default=5, help="linear lr warm-up (MAE)")
    add("--layer-decay", type=f, default=0.65, help="layer-wise lr decay (MAE: 0.65 ViT-B, 0.75 ViT-L; scratch: off)")
    add("--drop-path", type=f, default=0.1, help="ViT stochastic depth (MAE: 0.1, 0.2 for ViT-L)")
    add("--trainable-blocks", type=int, default=-1, help="fine-tune only the last N blocks / stages (-1: all)")
    add("--freeze-epochs", type=common.non_negative_int, default=0, help="first N epochs of the head alone (its own "
        "cosine), then the blocks --trainable-blocks names: a random head's gradients never reach them (LP-FT)")
    return p


# ----------------------------------------------------------------------------- models
def finetune_param_groups(encoder, classifier, layer_decay, weight_decay, trainable_blocks=-1):
    """AdamW groups at lr scale decay^(H − i) for layer i (MAE's util/lr_decay.py, after BEiT): 0 = stem (patch
    embedding, CLS, positions), 1..H-1 = ViT blocks / ResNet stages, H = the head and a ViT's final norm. No weight
    decay on biases, norms, the CLS token and the positions (MAE / timm); trainable_blocks N >= 0: the last N only."""
    if isinstance(encoder, common.VisionTransformer):
        head = len(encoder.blocks) + 1
        depth = lambda n: int(n.split(".")[1]) + 1 if n.startswith("blocks.") else (head if n.startswith("norm") else 0)
    else:
        head, depth = 5, lambda n: int(n[5]) if n.startswith("layer") else 0  # layer1..4 -> 1..4
    frozen_below = head - trainable_blocks if trainable_blocks >= 0 else 0
    groups = {}
    for name, p, i in [(n, p, depth(n)) for n, p in encoder.named_parameters()] + [
            ("head." + n, p, head) for n, p in classifier.named_parameters()]:
        p.requires_grad = i >= frozen_below
        if p.requires_grad:
            decay = p.ndim > 1 and name not in ("cls_token", "pos_embed")
            group = groups.setdefault((i, decay), {"params": [], "scale": layer_decay ** (head - i),
                                                   "weight_decay": weight_decay if decay else 0.0})
            group["params"].append(p)
    return list(groups.values())


# ----------------------------------------------------------------------------- data and metrics
def metrics(scores, labels, confusion=False):
    """top-1, top-5, macro-F1 (over the classes present in labels or predictions) and balanced accuracy (the mean
    recall of the classes present in labels: what top-1 hides about rare classes), in %; per_class: each class's
    precision and recall (None where it has no prediction / no image), and with confusion its matrix (rows: labels)."""
    num_classes = scores.shape[1]
    top = scores.topk(min(5, num_classes), dim=1).indices  # (N, 5)
    predictions = top[:, 0]
    counts = torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    matrix = counts.view(num_classes, num_classes)  # (C, C): [label, prediction]
    tp, predicted, actual = matrix.diag().float(), matrix.sum(0).float(), matrix.sum(1).float()
    support = predicted + actual
    f1 = 2 * tp[support > 0] / support[support > 0]  # 2TP / (2TP + FP + FN) per class
    per_class = dict(precision=torch.where(predicted > 0, tp / predicted, torch.nan).tolist(),
                     recall=torch.where(actual > 0, tp / actual, torch.nan).tolist())
    per_class = {k: [None if math.isnan(v) else v for v in values] for k, values in per_class.items()}
    return {"top1": 100 * (predictions == labels).float().mean().item(),
            "top5": 100 * (top == labels[:, None]).any(1).float().mean().item(), "macro_f1": 100 * f1.mean().item(),
            "balanced_accuracy": 100 * (tp / actual)[actual > 0].mean().item(),
            "per_class": {**per_class, **({"confusion": matrix.tolist()} if confusion else {})}}


def expected_calibration_error(logits, labels, temperature=1.0, bins=15):
    """ECE (Guo et al. 2017), in %: the top probability of softmax(logits / T) in 15 equal bins, each bin's gap
    |accuracy − mean confidence| weighted by its share of the images. 0: a score of 0.8 is right 80% of the time."""
    confidence, predictions = (logits / temperature).softmax(1).max(1)
    bin_of = (confidence * bins).long().clamp(max=bins - 1)  # (N,)
    gaps = torch.bincount(bin_of, (predictions == labels).float() - confidence, minlength=bins)  # Σ (correct − conf)
    return 100 * (gaps.abs().sum() / len(labels)).item()


def fit_temperature(logits, labels):
    """The T > 0 that minimises the cross-entropy of logits / T (temperature scaling, Guo et al. 2017): one number
    that rescales confidences without moving a prediction; a grid from 0.05 to 20 (log-spaced) is exact enough."""
    grid = torch.logspace(math.log10(0.05), math.log10(20), 200).tolist()
    losses = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])  # (200,): one read, not 200
    return grid[int(losses.argmin())]


def balanced_subset(labels, seed, fraction=1.0, per_class=None):
    """Indices of `fraction` of every class (at least one image each), or of per_class images of each (all of a class
    that has fewer), drawn with this seed: for a given seed, the same images whichever backbone is probed."""
    if fraction >= 1 and per_class is None:
        return torch.arange(len(labels))
    generator, keep = torch.Generator().manual_seed(seed), []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        count = per_class or max(1, round(fraction * len(members)))
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(keep).sort().values


def scores(outputs, seed, temperature=None, calibration=True):
    """{split: (logits, labels)} -> {split: metrics, ECE (and after scaling by the held-out temperature)}; k-NN: no
    ECE (votes are no logits)."""
    ece = lambda z, y: dict(ece=expected_calibration_error(z, y)) | (
        {"ece_scaled": expected_calibration_error(z, y, temperature)} if temperature else {})
    return {split: metrics(z, y, confusion=seed == 0) | (ece(z, y) if calibration else {}) for split, (z, y) in
            outputs.items()}


def mean_std(runs):
    """[{'top1': ..}, ..] over seeds -> {'top1': mean, 'top1_std': std, 'seeds': each seed's numbers (the paired
    differences read them)}; seed 0's per-class numbers as they are."""
    out, seeds = {}, [{k: v for k, v in r.items() if k != "per_class"} for r in runs]
    for key in seeds[0]:
        values = torch.tensor([r[key] for r in seeds])
        out[key], out[key + "_std"] = values.mean().item(), (values.std().item() if len(runs) > 1 else 0.0)
    return {**out, "seeds": seeds, **({"per_class_seed0": runs[0]["per_class"]} if "per_class" in runs[0] else {})}


def summary(runs, **extra):
    """Each seed's {split: metrics} -> (the val result with extra, the test split's apart: None without one)."""
    val = {**mean_std([run["val"] for run in runs]), **extra}
    return val, (mean_std([run["test"] for run in runs]) if "test" in runs[0] else None)


def global_batch(requested, num_images, world_size):
    """As asked (at most the labelled set), or 1024 (DINO, MAE) capped at a tenth of it, since an epoch of one step
    learns nothing; a multiple of the ranks, which share it equally."""
    batch = min(requested, num_images) if requested else max(8, min(1024, num_images // 10))
    return max(world_size, batch - batch % world_size)


class ShapeRandAugment(v2.RandAugment):
    """RandAugment without its colour and intensity ops, after --no-color (Sharpness stays: the methods keep blur)."""
    _AUGMENTATION_SPACE = {name: op for name, op in v2.RandAugment._AUGMENTATION_SPACE.items() if name not in
                           ("Brightness", "Color", "Contrast", "Posterize", "Solarize", "AutoContrast", "Equalize")}


def train_augmentation(image_size, args, rand_augment=False):
    """Crop (CIFAR's pad-and-crop up to 64 px: 8% crops leave a small image nothing) + the run's flips and turns;
    rand_augment: MAE's fine-tuning views (timm's rand-m9-mstd0.5-inc1 less the magnitude noise, random erasing)."""
    crop = (v2.RandomCrop(image_size, padding=image_size // 8) if image_size <= 64 else
            v2.RandomResizedCrop(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True))
    rand_augment_class = v2.RandAugment if args.color else ShapeRandAugment
    return v2.Compose([v2.ToImage(), *[v2.Grayscale(3)] * args.grayscale_input, crop,
                       *[v2.RandomHorizontalFlip()] * args.flip, *common.free_orientation(args.vflip, args.rot90),
                       *([rand_augment_class(num_ops=2, magnitude=9)] if rand_augment else []),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(args.mean, args.std),
                       *([v2.RandomErasing(0.25, value="random")] if rand_augment else [])])


def train_loader(dataset, indices, batch_size, dist_env, workers, seed):
    """Each rank loads batch_size / world_size images of every global batch, from its own shard."""
    subset = torch.utils.data.Subset(dataset, indices.tolist())
    sampler = torch.utils.data.DistributedSampler(subset, dist_env.world_size, dist_env.rank, shuffle=True, seed=seed,
                                                  drop_last=True)
    return torch.utils.data.DataLoader(subset, batch_size // dist_env.world_size, sampler=sampler, num_workers=workers,
                                       drop_last=True, pin_memory=dist_env.device.type == "cuda")


# ----------------------------------------------------------------------------- protocols
def seed_views(seed):
    """Once the model is built (the same weights on every rank): each rank its own crops, flips, RandAugment, erasing,
    MixUp / CutMix, drop-path (and DataLoader workers' seeds); rank 0 draws on as one process does."""
    if dist.is_initialized() and dist.get_rank() > 0:
        torch.manual_seed(seed + 1000003 * dist.get_rank())  # a prime stride: no rank meets another seed's stream


def run_knn(features, budget, args, num_classes):
    """Weighted k-NN for each k, a seed per label subset (one when every label is used: nothing to draw); the test
    split at the k chosen on val."""
    (train_x, train_y), evals = features["train"], {s: xy for s, xy in features.items() if s != "train"}
    runs = {}
    for seed in range(args.seeds if len(balanced_subset(train_y.cpu(), 0, **budget)) < len(train_y) else 1):
        subset = balanced_subset(train_y.cpu(), seed, **budget).to(train_y.device)
        # k above the images per class would let other classes outvote every class (k = 200 of 256 images): skipped
        ks = [k for k in args.k if k <= len(subset) // num_classes] or [min(min(args.k), len(subset))]
        if seed == 0 and len(ks) < len(args.k) and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"(k-NN: k above the {len(subset) // num_classes} labelled training images per class skipped)")
        for k in ks:
            votes = {s: (common.knn_classify(train_x[subset], train_y[subset], x, k, args.knn_temperature, num_classes),
                         y) for s, (x, y) in evals.items()}
            runs.setdefault(f"k={k}", []).append(scores(votes, seed, calibration=False))
    results = {k: summary(r) for k, r in runs.items()}  # k -> (val, test)
    best = max(results, key=lambda k: results[k][0]["top1"])
    return {k: val for k, (val, _) in results.items()}, results[best][1] and {**results[best][1], "k": best}


def train_linear(batches, steps_per_epoch, dim, num_classes, lr, epochs, seed, batch_normalize, device, ddp=False):
    """A linear classifier: SGD, momentum 0.9, cosine lr, no weight decay. batches(epoch) yields the epoch's
    (features, labels): cached (every rank the whole batch) or this rank's share (DDP)."""
    torch.manual_seed(seed)
    head = weights.linear_head(dim, num_classes, batch_normalize).to(device)
    model = DistributedDataParallel(head) if ddp else head
    seed_views(seed)
    optimizer, step = torch.optim.SGD(head.parameters(), lr, momentum=0.9), 0
    for epoch in tqdm(range(epochs), desc=f"linear head, lr {lr:g}, seed {seed}", leave=False,
                      disable=dist.is_initialized() and dist.get_rank() > 0):
        for x, y in batches(epoch):
            optimizer.param_groups[0]["lr"] = common.cosine_schedule(step, epochs * steps_per_epoch, lr, 0.0)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return head.eval()


def run_linear(features, budget, args, num_classes, on_the_fly=None, save=None):
    """Cached features; with on_the_fly(indices, lr, seed) -> head, the head trains on augmented views. save(name,
    module, result): seed 0's head, once measured. Returns (val result, test result or None)."""
    def fit(x, y, lr, seed):
        batch = global_batch(args.linear_batch_size, len(x), 1)
        batches = lambda epoch: [(x[b], y[b]) for b in torch.randperm(len(x), device=x.device).split(batch)
                                 if len(b) > 1]  # a last batch of one is dropped: BatchNorm needs two samples
        return train_linear(batches, math.ceil(len(x) / batch), x.shape[1], num_classes, lr, args.linear_epochs, seed,
                            not args.no_linear_bn, x.device)

    (train_x, train_y), evals = features["train"], {s: xy for s, xy in features.items() if s != "train"}
    runs, chosen, temperatures = [], [], []
    for seed in range(args.seeds):
        subset = balanced_subset(train_y.cpu(), seed, **budget)
        x, y, lr = train_x[subset], train_y[subset], args.linear_lr
        # 10% of the training labels held out (cached features, --augment too): the lr and the temperature are chosen
        # on them, by heads trained on the other 90%; val stays unseen until the final head is scored.
        held_out = torch.isin(torch.arange(len(y)), balanced_subset(y.cpu(), seed + 1000, 0.1)).to(y.device)
        search = {candidate: fit(x[~held_out], y[~held_out], candidate, seed)
                  for candidate in ([0.01, 0.03, 0.1, 0.3, 1.0, 3.0] if lr is None else [lr])}
        with torch.no_grad():
            held_out_logits = {candidate: head(x[held_out]) for candidate, head in search.items()}
        if lr is None:
            lr = [max(search, key=lambda c: (held_out_logits[c].argmax(1) == y[held_out]).float().mean().item())]
            if dist.is_initialized():  # rank 0's pick on every rank: each rank draws its own batches (seed_views),
                dist.broadcast_object_list(lr)  # and the heads that DDP trains (--augment) need one lr
            lr = lr[0]
        temperature = fit_temperature(held_out_logits[lr], y[held_out])
        head = fit(x, y, lr, seed) if on_the_fly is None else on_the_fly(subset, lr, seed)
        with torch.no_grad():
            runs.append(scores({s: (head(x), y) for s, (x, y) in evals.items()}, seed, temperature))
        chosen.append(lr)
        temperatures.append(temperature)
        if save and seed == 0:
            save("linear", head, runs[0]["val"])
    return summary(runs, lr=chosen, temperature=temperatures)


def linear_on_the_fly(readout, train_set, args, num_classes, dist_env):
    """--augment: each step embeds fresh views through the frozen encoder; each rank embeds its share of the global
    batch and DDP averages the head's gradients."""
    def train(indices, lr, seed):
        batch = global_batch(args.linear_batch_size, len(indices), dist_env.world_size)
        loader = train_loader(train_set, indices, batch, dist_env, args.workers, seed)

        def batches(epoch):
            loader.sampler.set_epoch(epoch)
            for images, labels in tqdm(loader, desc=f"linear --augment seed {seed} epoch {epoch + 1}", leave=False,
                                       disable=not dist_env.is_main):
                with torch.no_grad():
                    features = readout(images.to(dist_env.device, non_blocking=True))
                yield features, labels.to(dist_env.device, non_blocking=True)
        return train_linear(batches, len(loader), readout.dim, num_classes, lr, args.linear_epochs, seed,
                            not args.no_linear_bn, dist_env.device, ddp=dist_env.world_size > 1)
    return train


def finetune_step(model, optimizer, images, targets):
    """targets: labels, or MixUp/CutMix's soft (B, C) targets. A rank's loss is the mean over its own images and DDP
    averages the gradients: the same step as one process on the global batch."""
    with torch.autocast(images.device.type, torch.bfloat16, enabled=images.device.type == "cuda"):
        loss = F.cross_entropy(model(images), targets, label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def run_finetune(args, train_set, labels, eval_sets, dist_env, recipe, budget, scratch=False, save=None):
    """Each seed: the encoder and a new head trained on its label subset (after --freeze-epochs of the head alone),
    then scored on each eval split. Returns (val result, test result or None)."""
    runs, device, num_classes = [], dist_env.device, int(labels.max()) + 1
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        encoder, _ = weights.load_encoder(args, drop_path=args.drop_path, random_init=scratch)
        model = weights.Classifier(encoder, num_classes, global_pool=recipe == "mae").to(device)
        if dist_env.world_size > 1 and device.type == "cuda":
            model = common.convert_sync_batchnorm(model)  # ResNets: BN statistics over the global batch
        subset = balanced_subset(labels, seed, **budget)
        batch = global_batch(args.finetune_batch_size, len(subset), dist_env.world_size)
        loader = train_loader(train_set, subset, batch, dist_env, args.workers, seed)
        lr, first_epoch = args.finetune_base_lr * batch / 256, 0
        seed_views(seed)
        # MAE (timm's Mixup): MixUp α 0.8 or CutMix α 1.0, one of them per batch (switch prob 0.5)
        mix = v2.RandomChoice([v2.MixUp(alpha=0.8, num_classes=num_classes),
                               v2.CutMix(alpha=1.0, num_classes=num_classes)])
        bar = tqdm(total=(args.freeze_epochs + args.finetune_epochs) * len(loader), leave=False,
                   desc=f"fine-tune{' from scratch' if scratch else ''} seed {seed}", disable=not dist_env.is_main)
        for epochs, blocks, warmup in [(args.freeze_epochs, 0, 0),  # the head (and a ViT's final norm) alone
                                       (args.finetune_epochs, args.trainable_blocks,
                                        args.finetune_warmup_epochs * len(loader))]:
            # From scratch: no layer decay, which assumes lower layers that are already good.
            groups = finetune_param_groups(model.encoder, model.head, 1.0 if scratch else args.layer_decay,
                                           args.finetune_weight_decay, blocks)
            optimizer = torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")  # CPU: the default loop
            trained = DistributedDataParallel(model) if dist_env.world_size > 1 and epochs else model
            total, step = epochs * len(loader), 0
            for epoch in range(first_epoch, first_epoch + epochs):
                loader.sampler.set_epoch(epoch)
                model.train()
                for module in model.modules():  # frozen BN layers keep their statistics
                    frozen = not any(p.requires_grad for p in module.parameters())
                    if isinstance(module, nn.modules.batchnorm._BatchNorm) and frozen:
                        module.eval()
                for images, targets in loader:
                    for group in optimizer.param_groups:  # warm-up and cosine: each phase its own
                        group["lr"] = group["scale"] * common.cosine_schedule(step, total, lr, 1e-6, warmup)
                    images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                    if recipe == "mae":
                        images, targets = mix(images, targets)
                    loss = finetune_step(trained, optimizer, images, targets)
                    if step % 50 == 0 and dist_env.is_main:  # .item() waits for the GPU: read the loss now and then
                        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                    bar.update()
                    step += 1
            first_epoch += epochs
            del trained  # its hooks with it: the next phase's DDP covers the parameters it trains
        bar.close()
        # No held-out labels here (every one trains the model): the ECE without temperature scaling.
        runs.append(scores({split: weights.embed_split(model, dataset, args, dist_env, f"fine-tune: {split}")
                            for split, dataset in eval_sets.items()}, seed))
        if save and seed == 0:
            save("finetune", model, runs[0]["val"])
    return summary(runs)


class Backbone:
    """One encoder on the labelled data: the splits through its own eval transform (its image size and pixels), its
    features extracted once, the protocols run on it. random_init: its architecture, not its weights (the baselines:
    k-NN and linear at random init, fine-tuning from scratch)."""

    def __init__(self, args, dist_env, random_init=False):
        self.args, self.dist, self.random_init, self.features = args, dist_env, random_init, None
        torch.manual_seed(0)
        self.encoder, self.image_size = weights.load_encoder(args, random_init=random_init)
        weights.check_readout(self.encoder, args)
        self.vit = isinstance(self.encoder, common.VisionTransformer)
        self.recipe = args.recipe or ("mae" if self.vit else "plain")
        if not self.vit and self.recipe == "mae":
            raise common.UserError("--recipe mae is a ViT protocol (MAE)")
        self.splits = {split: self.build(split) for split in ["train", "val"] + ["test"] * common.has_split(
            args.data, "test")}
        self.labels = torch.tensor(weights.labels_of(self.splits["train"]))
        self.num_classes = int(self.labels.max()) + 1
        self.classes = getattr(self.splits["train"], "classes", None) or [str(c) for c in range(self.num_classes)]

    def build(self, split, views=None):
        args = self.args
        views = views or common.eval_transform(self.image_size, args.mean, args.std, args.grayscale_input)
        return common.build_dataset(args.data, split, views, args.data_root)

    def cached(self):
        if self.features is None:  # the readout and every split's features, once
            args = self.args
            model = weights.Readout(self.encoder, args.n_last_blocks, args.avgpool_patchtokens).to(self.dist.device)
            self.features = model.eval(), {split: weights.embed_split(model, data, args, self.dist, f"{split} features")
                                           for split, data in self.splits.items()}
        return self.features

    def save(self, name, model, result):  # --save: seed 0's, with what embed.py --head needs to predict
        if self.dist.is_main:
            weights.save_head(os.path.join(self.args.save, f"{name}.pth"), name, model, self.args, self.encoder,
                              self.classes, self.recipe, self.image_size, result["top1"])

    def run(self, protocol, budget, save=None):
        """(val result, test result or None) of one protocol at one label budget."""
        args, num_classes = self.args, self.num_classes
        if protocol == "finetune":
            train = self.build("train", train_augmentation(self.image_size, args, self.recipe == "mae"))
            evals = {split: data for split, data in self.splits.items() if split != "train"}
            return run_finetune(args, train, self.labels, evals, self.dist, self.recipe, budget, self.random_init, save)
        model, features = self.cached()
        if protocol == "knn":
            return run_knn(features, budget, args, num_classes)
        on_the_fly = linear_on_the_fly(model, self.build("train", train_augmentation(self.image_size, args)), args,
                                       num_classes, self.dist) if args.augment else None
        return run_linear(features, budget, args, num_classes, on_the_fly, save)


# ----------------------------------------------------------------------------- report
def difference(a, b):
    """a − b, seed by seed (each seed the same label subset for both), as mean ± std; k-NN's dict, k by k."""
    if "seeds" not in a:
        return {k: difference(a[k], b[k]) for k in a if k in b}
    pairs = list(zip(a["seeds"], b["seeds"])) or [(a, b)]
    differences = mean_std([{k: x[k] - y[k] for k in x if k in y and isinstance(x[k], float)} for x, y in pairs])
    return {k: v for k, v in differences.items() if k != "seeds"}


def reading(delta, other):
    """A paired top-1 difference (checkpoint − other) read by the rule: pre-training pays if it wins by 2-3 points."""
    mean, std = delta["top1"], delta["top1_std"]
    noise = "" if abs(mean) > 2 * std else f"; the seeds cannot tell them apart (± {std:.2f})"
    if mean >= 2:
        return f"    → pre-training beats {other} by {mean:.2f} points: it paid{noise}"
    return (f"    → pre-training is {mean:+.2f} points from {other}, short of 2-3: the unlabelled data probably did "
            f"not help{noise}")


def row(name, result, seconds=None, signed=False):
    cell = lambda key: (f"{result[key]:{'+' if signed else ''}.2f}"
                        + (f" ± {result[key + '_std']:.2f}" if key + "_std" in result else ""))
    ece = (f"{result['ece']:.1f}" + (f" → {result['ece_scaled']:.1f}" if "ece_scaled" in result else "")
           if "ece" in result and not signed else "")
    return (f"{name:<56}{cell('top1'):>16}{cell('top5'):>16}{cell('macro_f1'):>16}{cell('balanced_accuracy'):>16}"
            f"{ece:>14}" + (f"{seconds:>9.0f} s" if seconds is not None else ""))


def plot(x, y, method, confusion, classes, path):
    """Two panels: a 2-D map of the val features coloured by label (PCA: torch; t-SNE: scikit-learn), and where each
    class's val images went (confusion: seed 0's of the linear head or the fine-tuned model, rows: labels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if method == "tsne":
        from sklearn.manifold import TSNE
        xy = TSNE(2, init="pca", random_state=0).fit_transform(x.cpu().numpy())
    else:
        _, _, components = torch.pca_lowrank(x, q=2)  # centres x itself
        xy = ((x - x.mean(0)) @ components).cpu().numpy()  # (N, 2)
    fig, axes = plt.subplots(1, 2 if confusion else 1, figsize=(12 if confusion else 6, 6), squeeze=False)
    points = axes[0, 0].scatter(*xy.T, c=y.cpu().numpy(), s=4, cmap="tab10" if len(classes) <= 10 else "nipy_spectral")
    fig.colorbar(points, ax=axes[0, 0], label="class")
    axes[0, 0].set(title=f"{dict(pca='PCA', tsne='t-SNE')[method]} of the val features, by label", xticks=[], yticks=[])
    if confusion:
        rates = torch.tensor(confusion, dtype=torch.float)
        rates = (rates / rates.sum(1, keepdim=True).clamp(min=1)).numpy()  # (C, C): each label's share per prediction
        fig.colorbar(axes[0, 1].imshow(rates, cmap="Blues", vmin=0, vmax=1), ax=axes[0, 1], label="share of the class")
        axes[0, 1].set(title="confusion (seed 0)", xlabel="predicted", ylabel="label")
        if len(classes) <= 30:
            axes[0, 1].set_xticks(range(len(classes)), classes, rotation=90)
            axes[0, 1].set_yticks(range(len(classes)), classes)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(args):
    args.label_fraction = args.label_fraction or ([] if args.labels_per_class else [1.0])
    if repeated := [spec for i, spec in enumerate(args.compare) if spec in [args.checkpoint, *args.compare[:i]]]:
        raise common.UserError(f"--compare {repeated[0]}: already probed (the checkpoint, or given twice)")
    try:  # optional extras: fail now, not after an hour of fine-tuning
        [__import__(name) for name in ["matplotlib"] * bool(args.plot) + ["sklearn"] * (args.plot == "tsne")]
    except ImportError as error:
        raise common.UserError(f"--plot {args.plot} needs {error.name}: pip install matplotlib scikit-learn (or --plot "
                               "pca)") from None
    protocols = ["knn", "linear", "finetune"] if "all" in args.protocol else list(dict.fromkeys(args.protocol))
    dist_env = common.init_distributed()
    say = print if dist_env.is_main else (lambda *_, **__: None)
    given = dict(vars(args))  # the command line, before the checkpoint fills in its pixels and views
    primary = Backbone(args, dist_env)
    views = {name: getattr(args, name) for name in ("flip", "color", "vflip", "rot90")}

    def compared(spec):  # FILE[:ARCH]: the command line on another file (its image size and pixels unless given) and
        path, _, arch = spec.rpartition(":")  # the checkpoint's views (flips, colours): the data's, not the backbone's
        path, arch = (path, arch) if path and not os.path.isfile(spec) else (spec, None)  # a name with ':' is a name
        return Backbone(argparse.Namespace(**{**given, **views, "checkpoint": path, "arch": arch}), dist_env)
    backbones = {args.checkpoint: primary}
    backbones.update({"random init": Backbone(args, dist_env, True)} if args.baselines else {})
    backbones.update({spec: compared(spec) for spec in args.compare})  # every file read now: a bad one stops us here
    budgets = {f"{100 * f:g}% labels": dict(fraction=f) for f in args.label_fraction}
    budgets.update({f"{n} labels a class": dict(per_class=n) for n in args.labels_per_class})
    vit, first = primary.vit, next(iter(budgets))
    readout = "avg pool" if not vit else (("CLS" if args.n_last_blocks == 1 else f"CLS of {args.n_last_blocks} blocks")
                                          + " + avg patch" * args.avgpool_patchtokens)
    names = {"knn": f"k-NN {{}} (DINO, T {args.knn_temperature:g})",
             "linear": f"linear, {readout}, {'augmented' if args.augment else 'cached'} "
                       f"({'DINO' if vit and readout != 'CLS' else 'MAE §A.2'})",
             "finetune": f"fine-tune, {'MAE §A.3' if primary.recipe == 'mae' else 'plain'} recipe"}
    name_of = lambda protocol, k, labels: f"{names[protocol].format(k)}" + f", {labels}" * (len(budgets) > 1)
    settings = {**vars(args), "protocol": protocols, "recipe": primary.recipe, "readout": readout,
                "image_size": primary.image_size, "world_size": dist_env.world_size}
    # backbone -> labels -> protocol -> result: on val, on test (apart), and the checkpoint − backbone differences
    results = dict(checkpoint=args.checkpoint, data=args.data, settings=settings, val={}, test={}, difference_from={})
    at = lambda split, name, labels: results[split].setdefault(name, {}).setdefault(labels, {})
    say(f"{'backbone: protocol (paper)':<56}{'top-1':>16}{'top-5':>16}{'macro-F1':>16}{'balanced acc':>16}"
        f"{'ECE (→ T)':>14}{'time':>11}")
    for name, backbone in backbones.items():
        say(name + ("" if backbone is primary else "  (differences: the checkpoint − this, paired by seed)"))
        for labels, budget in budgets.items():
            for protocol in protocols:
                start = time.time()
                keep = (backbone, labels) == (primary, first) and args.save
                at("val", name, labels)[protocol], test = backbone.run(protocol, budget, keep and primary.save)
                if test is not None:
                    at("test", name, labels)[protocol] = test
                result = results["val"][name][labels][protocol]
                for k, r in (result.items() if protocol == "knn" else [("", result)]):  # k-NN: a row per k
                    say(row("  " + name_of(protocol, k, labels), r, time.time() - start))
                if backbone is not primary:
                    delta = difference(results["val"][args.checkpoint][labels][protocol], result)
                    at("difference_from", name, labels)[protocol] = delta
                    for k, d in (delta.items() if protocol == "knn" else [("", delta)]):
                        say(row(f"  difference {k}".rstrip(), d, signed=True))
                    if name != "random init":  # the rule of thumb, on k-NN's first k or the protocol's result
                        say(reading(next(iter(delta.values())) if protocol == "knn" else delta, name))
        backbone.features = None if backbone is not primary else backbone.features  # the checkpoint's: --plot
    results.update(results["val"][args.checkpoint][first])  # the checkpoint's results at the first budget, on top
    if args.baselines:
        results.update(baselines=results["val"]["random init"][first],
                       difference=results["difference_from"]["random init"][first])
    if results["test"]:  # scored by the heads and models that val reported, at the k val chose: printed only now
        say("test split (scored once, with the choices made without it)")
        for name, by_labels in results["test"].items():
            for labels, by_protocol in by_labels.items():
                for protocol, result in by_protocol.items():
                    say(row(f"  {name}: " + name_of(protocol, result.get("k", ""), labels), result))
    tag = "+".join(f"{f:g}" for f in args.label_fraction) + "".join(f"_{n}pc" for n in args.labels_per_class)
    name = f"probe_{os.path.basename(args.data.rstrip('/'))}_{'+'.join(protocols)}_labels{tag}.json"
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), name.replace(":", "_"))
    if dist_env.is_main:
        with open(output, "w") as f:
            json.dump(results, f, indent=2)
        say(f"results written to {output}")
    if args.plot:
        _, features = primary.cached()  # every rank takes part in the extraction
    if dist_env.world_size > 1:  # the last collective: t-SNE takes minutes, NCCL's watchdog aborts a rank left waiting
        dist.barrier()  # rank 0 has written; the others exit while it plots
    if args.plot and dist_env.is_main:
        trained = [results[p]["per_class_seed0"]["confusion"] for p in ("linear", "finetune") if p in protocols]
        plot(*features["val"], args.plot, (trained or [None])[0], primary.classes, image := os.path.splitext(
            output)[0] + f"_{args.plot}.png")
        say(f"{args.plot} plot written to {image}")
    return results


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except common.UserError as error:
        sys.exit(common.error_line("probe.py", error))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
