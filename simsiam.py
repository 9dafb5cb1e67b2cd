r"""SimSiam: exploring simple Siamese representation learning (Chen & He, CVPR 2021, arXiv:2011.10566).

No negatives and no momentum encoder. One network f (encoder + projector) embeds both views,
z = f(x); a predictor h maps one view's z to p = h(z), which must match the other view's z (§3):

    L = ½·D(p1, sg(z2)) + ½·D(p2, sg(z1)),   D(p, z) = −cos(p, z)

What prevents collapse (every image -> one constant, which would make L = −1): the stop-gradient
sg, which makes z a fixed target for each step, together with the predictor h. Remove either and
the loss falls to −1 at once while the outputs collapse (Fig. 2 without sg; Table 1 without h).
Each epoch logs embedding_std (std of the L2-normalised z, §4.1: ≈ 1/√d healthy, → 0 collapsed)
and warns when it falls.

    python simsiam.py --data shapes:32:1000:2000 --arch vit_nano --patch-size 8 --epochs 8 --batch-size 64 \
        --proj-hidden 256 --proj-dim 256 --pred-hidden 64 --base-lr 1 --warmup-epochs 1
        # CPU, ~1 min: k-NN 25.8 -> 33.9% (seed 0, with the official per-epoch cosine; base-lr 2 there: 28.2%)
    python simsiam.py --data shapes:32:5000:2000 --arch vit_nano --patch-size 8 --batch-size 64 --proj-hidden 512 \
        --proj-dim 512 --pred-hidden 128 --base-lr 1 --epochs 6 --warmup-epochs 1 --knn-every 1 --workers 0
        # benchmarks/learning.py's recipe, ~4 min on one core: linear probe 29.1 -> 40.3% (+11.2 ± 1.1, 3 seeds);
        # without the warm-up epoch (not in the paper, at batch 512) the gain was a lottery: +23.0, +4.2, +9.2
    torchrun --nproc_per_node=8 simsiam.py --data /imagenet                                   # paper recipe

Paper: ResNet-50, batch 512, 100 epochs -> 68.1% linear top-1 on ImageNet (Table 4); 800 -> 71.3%.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common


# ----------------------------------------------------------------------------- config
def get_args_parser():
    p = argparse.ArgumentParser("simsiam.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="shapes[:SIZE[:N[:V]]], cifar10, cifar100, stl10, or an ImageFolder root")
    g.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    g.add_argument("--image-size", type=common.positive_int, default=None, help="crop size (default: 224 for folders, 32 CIFAR, 96 STL-10)")
    g.add_argument("--workers", type=common.non_negative_int, default=min(8, os.cpu_count()), help="data-loading processes per GPU")
    g.add_argument("--cpu-augment", action="store_true", help="augment in DataLoader workers even when the dataset fits on the device")
    common.add_data_args(g, crop_scale=(0.2, 1.0))  # --no-flip, --no-color, --grayscale-input, --mean, --std, --val, ...
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", choices=common.ARCHS, help="encoder")
    g.add_argument("--patch-size", type=common.positive_int, default=16, help="ViT patch size")
    g.add_argument("--init", default="", help="continued pre-training: the encoder starts from a torchvision ResNet or timm-named ViT "
                   "state_dict (official DINO, MAE, MoCo v3 files too) or a checkpoint of this project; projector and predictor start fresh")
    g.add_argument("--proj-hidden", type=common.positive_int, default=2048, help="projector hidden width (3 layers, BN after each)")
    g.add_argument("--proj-dim", type=common.positive_int, default=2048, help="projector output width (z)")
    g.add_argument("--pred-hidden", type=common.positive_int, default=512, help="predictor bottleneck width (the predictor maps z to z's width)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=common.positive_int, default=100, help="training epochs (800 for the paper's best)")
    g.add_argument("--warmup-epochs", type=common.non_negative_int, default=0, help="linear lr warm-up (the paper has none at batch 512)")
    g.add_argument("--batch-size", type=common.positive_int, default=512, help="global batch, split over the GPUs")
    g.add_argument("--base-lr", type=float, default=0.05, help="lr = base-lr × batch-size / 256 (SGD)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="on every parameter, as in the official code")
    g.add_argument("--fix-pred-lr", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the predictor at the initial lr while the rest decays (§4.2: slightly better, 68.1%%)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/simsiam", help="checkpoint.pth and log.jsonl; resumes from it if present")
    g.add_argument("--resume", default="", help="resume from this checkpoint instead of OUTPUT_DIR/checkpoint.pth")
    g.add_argument("--save-every", type=common.non_negative_int, default=0, help="also keep OUTPUT_DIR/checkpoint_EPOCH.pth every N epochs (0: off)")
    g.add_argument("--keep", type=common.non_negative_int, default=0, help="with --save-every: keep only the last K numbered snapshots (0: all)")
    g.add_argument("--knn-every", type=common.non_negative_int, default=10, help="k-NN monitor on the val split every N epochs and at the end (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps, then faster)")
    return p


# ----------------------------------------------------------------------------- model
class SimSiam(nn.Module):
    """Encoder + projector f (3 Linear layers, BN after each, the last BN without affine) and a
    bottleneck predictor h, Linear(512)-BN-ReLU-Linear with no BN on the output (§3, Baseline settings)."""

    def __init__(self, encoder, proj_hidden, proj_dim, pred_hidden):
        super().__init__()
        self.encoder = encoder
        self.projector = common.mlp([encoder.embed_dim, proj_hidden, proj_hidden, proj_dim], last_bn=True)
        self.predictor = common.mlp([proj_dim, pred_hidden, proj_dim], last_bn=False, last_bias=True)  # official: with bias

    def forward(self, x1, x2):
        """Predictions p = h(f(x)) and projections z = f(x) of both views.
        Each view is its own forward, so BN statistics are per view, as in the official code."""
        z1, z2 = self.projector(self.encoder(x1)), self.projector(self.encoder(x2))
        return self.predictor(z1), self.predictor(z2), z1, z2


# ----------------------------------------------------------------------------- objective
def negative_cosine(p, z):
    """D(p, z) = −cos(p, z) (Eq. 1), mean over the batch. .detach() is the paper's stop-gradient
    sg(z) (Eq. 3): z is a constant target, so f learns only through the predicted side p."""
    p, z = F.normalize(p.float(), dim=1), F.normalize(z.detach().float(), dim=1)  # (N, D) unit vectors
    return -(p * z).sum(dim=1).mean()


# ----------------------------------------------------------------------------- training step
def training_step(model, views, args):
    p1, p2, z1, z2 = model(*views)
    # No gather: unlike SimCLR's, each image's loss involves only its own two views, so the mean
    # over a GPU's images plus DDP's average of the gradients is the global batch's step.
    # Symmetrised with ½ (Eq. 2): view 1 predicts view 2's projection and vice versa, so L ∈ [−1, 1].
    loss = 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)
    return loss, z1  # z1 carries the collapse signal (Fig. 2 measures the std of z / ‖z‖)


# ----------------------------------------------------------------------------- loop
def augmentations(args):
    """MoCo v2's views, the same recipe for both (official code): crop 0.2-1, jitter not strengthened."""
    views = common.MultiView([common.View(args.image_size, tuple(args.crop_scale), jitter=(0.4, 0.4, 0.4, 0.1), blur=0.5)] * 2)
    return common.domain_views(views, args)  # --no-flip, --no-color, ... (default: the paper's)


def build_model(args):
    # Residual blocks start as the identity (official builder.py: base_encoder(zero_init_residual=True)).
    encoder = common.build_encoder(args.arch, args.image_size, args.patch_size, zero_init_residual=True)
    common.load_encoder_weights(encoder, args)  # --init: continued pre-training from public weights
    return SimSiam(encoder, args.proj_hidden, args.proj_dim, args.pred_hidden)


def main(args):
    dist_env = common.init_distributed()
    device = dist_env.device
    args.image_size = args.image_size or common.default_image_size(args.data)
    common.start_run(args, dist_env)  # flags argparse cannot check, OUTPUT_DIR writable: fail now, not after an epoch
    if args.batch_size % dist_env.world_size:
        raise common.UserError(f"--batch-size {args.batch_size} is not divisible by {dist_env.world_size} processes")
    if args.batch_size // dist_env.world_size < 2:  # BN in the heads normalises over the images of each GPU
        raise common.UserError(f"--batch-size {args.batch_size}: BatchNorm needs at least 2 images per process")
    dataset = common.build_dataset(args.data, "pretrain", augmentations(args), args.data_root, args.skip_bad_images)
    loader = common.make_loader(dataset, args.batch_size // dist_env.world_size, dist_env, args.workers,
                                on_device=not args.cpu_augment)
    if len(loader) == 0:
        raise common.UserError(f"{len(dataset)} images cannot fill one batch of {args.batch_size}")

    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    if args.arch.startswith("resnet") and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    lr = args.base_lr * args.batch_size / 256  # linear scaling rule (§3, baseline settings)
    optimizer = torch.optim.SGD([{"params": [*model.encoder.parameters(), *model.projector.parameters()], "fix_lr": False},
                                 {"params": model.predictor.parameters(), "fix_lr": args.fix_pred_lr}],
                                lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    encoder_config = dict(arch=args.arch, image_size=args.image_size, patch_size=args.patch_size)

    start_epoch, step, rng = 0, 0, None
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    resume_path = args.resume or (checkpoint_path if os.path.exists(checkpoint_path) else "")
    if resume_path:
        checkpoint = common.load_checkpoint(resume_path, "simsiam")
        if checkpoint["encoder_config"] != encoder_config:
            raise common.UserError(f"{resume_path} holds {checkpoint['encoder_config']}, not {encoder_config}")
        common.check_same_run(checkpoint, args, resume_path)  # other data, model, batch or lr: refused
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, step, rng = checkpoint["epoch"], checkpoint["step"], checkpoint.get("rng")
        if dist_env.is_main:
            print(f"resumed from {resume_path} at epoch {start_epoch}")

    raw_model = model
    if dist_env.world_size > 1:
        # SyncBN: BN statistics over the global batch of each view, as in the paper; per-GPU
        # statistics of small shards would be noisier and change with the number of GPUs.
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif dist_env.is_main:  # torch's SyncBN is CUDA-only: gloo ranks keep per-rank BN
            print("note: SyncBatchNorm needs CUDA; on CPU each rank normalises with its own batch statistics")
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        raw_model = model.module
    if args.compile:
        model = torch.compile(model)  # checkpoints keep saving raw_model: plain names, loadable anywhere
    knn = lambda: common.knn_monitor(raw_model.encoder, args, args.batch_size // dist_env.world_size, dist_env)
    if args.knn_every and step == 0:  # a fresh run (a resumed one may be mid-epoch 1)
        knn_init = knn()
        if dist_env.is_main and knn_init is not None:
            print(f"k-NN top-1 at random init: {100 * knn_init:.2f}%")
            common.log_jsonl(os.path.join(args.output_dir, "log.jsonl"), {"epoch": 0, "knn_top1": knn_init})

    record = {}
    state = lambda **position: dict(method="simsiam", encoder_config=encoder_config, encoder=raw_model.encoder.state_dict(),  # noqa: E731
                                    args=vars(args), model=raw_model.state_dict(), optimizer=optimizer.state_dict(), **position)
    preempted = common.Preemption()  # SIGTERM sets it; the loop saves at the next step boundary
    total_steps, warmup_steps = args.epochs * len(loader), args.warmup_epochs * len(loader)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(args.seed * 100003 + epoch * 1000 + dist_env.rank)  # resume replays the same augmentations
        start, losses, stds = time.time(), [], []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not dist_env.is_main)
        for views, _ in common.resume_batches(bar, step - epoch * len(loader), rng):  # skips what a pre-empted run did
            # The cosine moves once per epoch, as the official adjust_learning_rate (main_simsiam.py); only
            # a warm-up (none in the paper) ramps per step.
            scheduled = common.cosine_schedule(step if step < warmup_steps else epoch * len(loader), total_steps, lr, 0.0, warmup_steps)
            for group in optimizer.param_groups:
                # --fix-pred-lr (§4.2): the predictor keeps adapting to the latest representations.
                group["lr"] = lr if group["fix_lr"] else scheduled
            views = [v.to(device, non_blocking=True) for v in views]
            if args.arch.startswith("resnet") and device.type == "cuda":
                views = [v.to(memory_format=torch.channels_last) for v in views]
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss, z = training_step(model, views, args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            common.check_finite(losses[-1], epoch, step, optimizer.param_groups[0]["lr"])  # diverged: stop before any save
            stds.append(common.embedding_std(z))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                            img_s=f"{len(losses) * args.batch_size / (time.time() - start):.0f}")
            if preempted(dist_env) and step % len(loader):  # SIGTERM: save here (with the RNG: exact resume
                # mid-epoch) and exit; at an epoch's last step, the epoch's own save comes first
                common.save_and_stop(state(epoch=epoch, step=step, rng=common.rng_state()), checkpoint_path, dist_env)

        record = dict(epoch=epoch + 1, loss=sum(losses) / len(losses), embedding_std=sum(stds) / len(stds),
                      lr=optimizer.param_groups[0]["lr"],
                      images_per_s=len(losses) * args.batch_size / (time.time() - start))
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            record["knn_top1"] = knn()
        common.check_finite(record["loss"], epoch, step, record["lr"], raw_model)  # weights too, once an epoch
        if dist_env.is_main:
            common.save_checkpoint(state(epoch=epoch + 1, step=step), checkpoint_path)
            common.keep_snapshots(checkpoint_path, epoch + 1, args.save_every, args.keep)
            common.log_jsonl(os.path.join(args.output_dir, "log.jsonl"), record)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if v is not None))
            if warning := common.collapse_warning(record["embedding_std"], args.proj_dim):
                print(warning, flush=True)
    if dist_env.is_main and record.get("knn_top1") is not None:
        print(f"k-NN top-1 (k=20) on the val split: {100 * record['knn_top1']:.2f}%")
    if dist_env.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except common.UserError as error:
        sys.exit(common.error_line("simsiam.py", error))  # exit code 1, printed once under torchrun
