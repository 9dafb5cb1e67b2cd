"""How good is a saved encoder? k-NN, linear probe and fine-tuning on a labelled dataset.

    python probe.py runs/simclr/checkpoint.pth --data shapes --protocol all
    python probe.py resnet50.pth --arch resnet50 --data /imagenet --protocol linear   # plain state_dict
    python probe.py runs/mae/checkpoint.pth --data /imagenet --protocol finetune --label-fraction 0.01

- knn: weighted k-NN on L2-normalised features (DINO's protocol: vote exp(s/T), T = 0.07).
- linear: frozen encoder, features computed once (centre crop, no augmentation) and cached; a
  linear classifier behind a BatchNorm without affine (MAE §A.2; an affine map of the features, so
  it changes conditioning, not capacity). Its lr is chosen on 10% of the *training* labels held out,
  never on the val split, then it is retrained on all of them for each seed: mean ± std.
- finetune: end to end with supervised augmentation, AdamW, and layer-wise lr decay (ViT blocks or
  ResNet stages: layer i of L trains at lr × decay^(L − i)); --trainable-blocks N freezes all but
  the last N.
--label-fraction 0.01 / 0.1 keeps that share of each class's training labels (seeded): the
semi-supervised protocol. Reported: top-1, top-5 and macro-F1 on the val split, as a table and JSON.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import common
from common import knn_classify  # noqa: F401  (the k-NN rule lives in common.py: methods monitor with it)


def get_args_parser():
    p = argparse.ArgumentParser("probe.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint of this project's methods, or a plain state_dict with --arch")
    p.add_argument("--data", required=True, help="shapes[:SIZE[:N[:V]]], cifar10, cifar100, stl10, or an ImageFolder root with train/ and val/")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    p.add_argument("--protocol", default="all", choices=["knn", "linear", "finetune", "all"], help="all = knn + linear + finetune")
    p.add_argument("--arch", default=None, choices=common.ARCHS, help="only for a plain torchvision/timm-named state_dict")
    p.add_argument("--patch-size", type=common.positive_int, default=16, help="ViT patch size, with --arch")
    p.add_argument("--image-size", type=common.positive_int, default=None, help="default: the checkpoint's training size")
    p.add_argument("--label-fraction", type=float, default=1.0, help="share of training labels per class (0.01, 0.1: semi-supervised)")
    p.add_argument("--seeds", type=common.positive_int, default=3, help="linear/fine-tune repeats (and label subsets): mean ± std")
    p.add_argument("--batch-size", type=common.positive_int, default=256, help="feature extraction batch")
    p.add_argument("--workers", type=common.non_negative_int, default=min(8, os.cpu_count()), help="data-loading processes")
    p.add_argument("--output", default=None, help="results JSON (default: next to the checkpoint)")
    g = p.add_argument_group("k-NN")
    g.add_argument("--k", type=common.positive_int, nargs="+", default=[10, 20, 100, 200], help="neighbour counts reported")
    g.add_argument("--knn-temperature", type=common.positive_float, default=0.07, help="T in the exp(s/T) vote")
    g = p.add_argument_group("linear")
    g.add_argument("--linear-epochs", type=common.positive_int, default=100, help="epochs over the cached features")
    g.add_argument("--linear-lr", type=float, default=None, help="SGD lr; default: chosen from 0.01-3 on held-out training labels")
    g.add_argument("--no-linear-bn", action="store_true", help="drop the BatchNorm (no affine) in front of the classifier")
    g = p.add_argument_group("fine-tune")
    g.add_argument("--finetune-epochs", type=common.positive_int, default=100, help="MAE: 100 for ViT-B, 50 for ViT-L")
    g.add_argument("--finetune-batch-size", type=common.positive_int, default=1024)
    g.add_argument("--finetune-base-lr", type=float, default=5e-4, help="AdamW lr = base × batch / 256 (MAE)")
    g.add_argument("--finetune-weight-decay", type=float, default=0.05)
    g.add_argument("--finetune-warmup-epochs", type=common.non_negative_int, default=5)
    g.add_argument("--layer-decay", type=float, default=0.65, help="layer-wise lr decay (MAE: 0.65 ViT-B, 0.75 ViT-L; 1 = off)")
    g.add_argument("--drop-path", type=float, default=0.1, help="ViT stochastic depth while fine-tuning")
    g.add_argument("--trainable-blocks", type=int, default=-1, help="fine-tune only the last N blocks/stages (-1: all)")
    return p


# ----------------------------------------------------------------------------- encoder
def load_encoder(args, drop_path=0.0):
    """(encoder, image_size) from a project checkpoint, or from a plain state_dict and --arch."""
    if args.arch is None:
        checkpoint = common.load_checkpoint(args.checkpoint)
        config, state = dict(checkpoint["encoder_config"]), checkpoint["encoder"]
    else:
        if not os.path.isfile(args.checkpoint):
            raise common.UserError(f"checkpoint {args.checkpoint}: no such file")
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        state = state.get("encoder", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise common.UserError(f"{args.checkpoint} holds no state_dict")
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}  # a supervised classifier
        config = dict(arch=args.arch, image_size=args.image_size or common.default_image_size(args.data),
                      patch_size=args.patch_size)
    if config["arch"].startswith("vit"):
        config["drop_path"] = drop_path
    encoder = common.build_encoder(**config)
    try:
        encoder.load_state_dict(state)
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise common.UserError(f"{args.checkpoint} does not fit a {config['arch']}: {detail}") from None
    if not common.all_finite(state):  # a diverged run's weights would give normal-looking, meaningless numbers
        raise common.UserError(f"{args.checkpoint}: the encoder has non-finite (NaN or inf) weights; its run diverged")
    return encoder, args.image_size or config["image_size"]


def layer_ids(encoder):
    """[(name, parameter, depth index)] and the head's index H: 0 = stem (patch embedding, CLS,
    positions), 1..H-1 = ViT blocks / ResNet stages, and the ViT's final norm shares the head's H
    (MAE's util/lr_decay.py, after BEiT): the last block trains at lr × decay, the norm at lr."""
    if isinstance(encoder, common.VisionTransformer):
        head = len(encoder.blocks) + 1
        return [(n, p, int(n.split(".")[1]) + 1 if n.startswith("blocks.") else (head if n.startswith("norm") else 0))
                for n, p in encoder.named_parameters()], head
    return [(n, p, int(n[5]) if n.startswith("layer") else 0) for n, p in encoder.named_parameters()], 5  # layer1..4 -> 1..4


def finetune_param_groups(encoder, classifier, layer_decay, weight_decay, trainable_blocks=-1):
    """AdamW groups with lr scale decay^(H − i) for layer i; no weight decay on biases, norms, the CLS
    token and the position embedding (MAE / timm). trainable_blocks N >= 0 freezes all but the last N."""
    ids, head = layer_ids(encoder)
    frozen_below = head - trainable_blocks if trainable_blocks >= 0 else 0
    groups = {}
    for name, p, i in ids + [("head." + n, p, head) for n, p in classifier.named_parameters()]:
        p.requires_grad = i >= frozen_below
        if p.requires_grad:
            decay = p.ndim > 1 and name not in ("cls_token", "pos_embed")
            group = groups.setdefault((i, decay), {"params": [], "scale": layer_decay ** (head - i),
                                                   "weight_decay": weight_decay if decay else 0.0})
            group["params"].append(p)
    return list(groups.values())


# ----------------------------------------------------------------------------- metrics
def metrics(scores, labels):
    """top-1, top-5 and macro-F1 (over the classes present in labels or predictions), in %."""
    num_classes = scores.shape[1]
    top = scores.topk(min(5, num_classes), dim=1).indices  # (N, 5)
    predictions = top[:, 0]
    tp = torch.bincount(labels[predictions == labels], minlength=num_classes).float()
    support = torch.bincount(predictions, minlength=num_classes) + torch.bincount(labels, minlength=num_classes)
    f1 = 2 * tp[support > 0] / support[support > 0]  # 2TP / (2TP + FP + FN) per class
    return {"top1": 100 * (predictions == labels).float().mean().item(),
            "top5": 100 * (top == labels[:, None]).any(1).float().mean().item(), "macro_f1": 100 * f1.mean().item()}


def balanced_subset(labels, fraction, seed):
    """Indices of `fraction` of every class (at least one image each), drawn with this seed."""
    if fraction >= 1:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:max(1, round(fraction * len(members)))]])
    return torch.cat(keep).sort().values


def mean_std(runs):
    """{'top1': [..]} over seeds -> {'top1': mean, 'top1_std': std}."""
    out = {}
    for key in runs[0]:
        values = torch.tensor([r[key] for r in runs])
        out[key], out[key + "_std"] = values.mean().item(), (values.std().item() if len(runs) > 1 else 0.0)
    return out


# ----------------------------------------------------------------------------- protocols
def run_knn(train_x, train_y, val_x, val_y, args, num_classes):
    return {f"k={k}": metrics(knn_classify(train_x, train_y, val_x, k, args.knn_temperature, num_classes), val_y)
            for k in args.k}


def train_linear(x, y, num_classes, lr, epochs, seed, batch_normalize=True, batch_size=1024):
    """A linear classifier on cached features: SGD, momentum 0.9, cosine lr, no weight decay."""
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes)
    if batch_normalize:
        head = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False), head)
    head = head.to(x.device)
    optimizer = torch.optim.SGD(head.parameters(), lr, momentum=0.9)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    for step in range(epochs * steps_per_epoch):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x), device=x.device)
        batch = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        optimizer.param_groups[0]["lr"] = common.cosine_schedule(step, epochs * steps_per_epoch, lr, 0.0)
        loss = F.cross_entropy(head(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head.eval()


def run_linear(train_x, train_y, val_x, val_y, args, num_classes):
    runs, chosen = [], []
    for seed in range(args.seeds):
        subset = balanced_subset(train_y, args.label_fraction, seed)
        x, y = train_x[subset], train_y[subset]
        lr = args.linear_lr
        if lr is None:  # select on held-out training labels: the val split stays unseen
            held_out = torch.zeros(len(y), dtype=torch.bool)
            held_out[balanced_subset(y.cpu(), 0.1, seed + 1000)] = True
            held_out = held_out.to(y.device)
            def held_out_top1(candidate):
                head = train_linear(x[~held_out], y[~held_out], num_classes, candidate, args.linear_epochs, seed, not args.no_linear_bn)
                return (head(x[held_out]).argmax(1) == y[held_out]).float().mean().item()
            lr = max([0.01, 0.03, 0.1, 0.3, 1.0, 3.0], key=held_out_top1)
        head = train_linear(x, y, num_classes, lr, args.linear_epochs, seed, not args.no_linear_bn)
        with torch.no_grad():
            runs.append(metrics(head(val_x), val_y))
        chosen.append(lr)
    return {**mean_std(runs), "lr": chosen}


def run_finetune(args, train_set, val_set, num_classes, device):
    runs = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        encoder, _ = load_encoder(args, drop_path=args.drop_path)
        model = nn.Sequential(encoder, nn.Linear(encoder.embed_dim, num_classes)).to(device)
        lr = args.finetune_base_lr * args.finetune_batch_size / 256
        optimizer = torch.optim.AdamW(finetune_param_groups(encoder, model[1], args.layer_decay, args.finetune_weight_decay,
                                                            args.trainable_blocks), lr=lr)
        subset = torch.utils.data.Subset(train_set, balanced_subset(torch.tensor(labels_of(train_set)), args.label_fraction, seed).tolist())
        loader = torch.utils.data.DataLoader(subset, min(args.finetune_batch_size, len(subset)), shuffle=True,
                                             num_workers=args.workers, drop_last=True)
        total, step = args.finetune_epochs * len(loader), 0
        for epoch in range(args.finetune_epochs):
            model.train()
            for name, module in encoder.named_modules():  # frozen BN layers keep their statistics
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
                    module.eval()
            for images, labels in loader:
                for group in optimizer.param_groups:
                    group["lr"] = group["scale"] * common.cosine_schedule(step, total, lr, 1e-6, args.finetune_warmup_epochs * len(loader))
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss = F.cross_entropy(model(images.to(device)), labels.to(device), label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
        val_x, val_y = common.extract_features(model, common.make_loader(val_set, args.batch_size, common.DistEnv(device=device),
                                                                           args.workers, train=False), common.DistEnv(device=device))
        runs.append(metrics(val_x, val_y))
    return mean_std(runs)


def labels_of(dataset):
    if hasattr(dataset, "targets"):
        return list(dataset.targets)
    if hasattr(dataset, "labels"):
        return list(dataset.labels)
    return [dataset[i][1] for i in range(len(dataset))]  # shapes: labels are cheap to render


# ----------------------------------------------------------------------------- main
def main(args):
    if not 0 < args.label_fraction <= 1:
        raise common.UserError(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist_env = common.DistEnv(device=device)
    encoder, image_size = load_encoder(args)
    encoder = encoder.to(device)
    train_set = common.build_dataset(args.data, "train", common.eval_transform(image_size), args.data_root)
    val_set = common.build_dataset(args.data, "val", common.eval_transform(image_size), args.data_root)
    labels = labels_of(train_set)
    num_classes = max(labels) + 1
    results = {"checkpoint": args.checkpoint, "data": args.data, "label_fraction": args.label_fraction}

    if args.protocol in ("knn", "linear", "all"):
        train_x, train_y = common.extract_features(encoder, common.make_loader(train_set, args.batch_size, dist_env, args.workers, False), dist_env)
        val_x, val_y = common.extract_features(encoder, common.make_loader(val_set, args.batch_size, dist_env, args.workers, False), dist_env)
        if args.protocol in ("knn", "all"):
            subset = balanced_subset(train_y.cpu(), args.label_fraction, 0).to(device)
            results["knn"] = run_knn(train_x[subset], train_y[subset], val_x, val_y, args, num_classes)
        if args.protocol in ("linear", "all"):
            results["linear"] = run_linear(train_x, train_y, val_x, val_y, args, num_classes)
    if args.protocol in ("finetune", "all"):
        augment = (v2.Compose([v2.ToImage(), v2.RandomCrop(image_size, padding=image_size // 8), v2.RandomHorizontalFlip()])
                   if image_size <= 64 else  # CIFAR-style pad-and-crop for small images
                   v2.Compose([v2.ToImage(), v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]))
        train_aug = common.build_dataset(args.data, "train", v2.Compose([augment, *common.to_normalized_tensor()]), args.data_root)
        results["finetune"] = run_finetune(args, train_aug, val_set, num_classes, device)

    print(f"\n{'protocol':<22}{'top-1':>16}{'top-5':>16}{'macro-F1':>16}")
    for name, row in [(f"knn {k}", r) for k, r in results.get("knn", {}).items()] + \
                     [(p, results[p]) for p in ("linear", "finetune") if p in results]:
        cell = lambda key: f"{row[key]:.2f}" + (f" ± {row[key + '_std']:.2f}" if key + "_std" in row else "")
        print(f"{name:<22}{cell('top1'):>16}{cell('top5'):>16}{cell('macro_f1'):>16}")
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                         f"probe_{os.path.basename(args.data.rstrip('/'))}.json".replace(":", "_"))
    with open(output, "w") as f:
        json.dump(results, f, indent=2)
    print(f"results written to {output}")
    return results


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except common.UserError as error:
        sys.exit(f"probe.py: error: {error}")
