r"""SimCLR: contrastive learning of visual representations (Chen et al., ICML 2020, arXiv:2002.05709).

Two random views of every image go through an encoder f and a projector g, z = g(f(x)). Each view
must pick out its partner among the 2N views of the batch (NT-Xent, §2.1):

    l(i, j) = -log  exp(sim(z_i, z_j) / τ)  /  Σ_{k ≠ i} exp(sim(z_i, z_k) / τ),   sim = cosine

averaged over all 2N anchors. More negatives help, so under DDP the batch is the *global* one.
f(x) is kept for downstream tasks; g is thrown away (§4.2: f's features are better than z's).

    python simclr.py --data shapes:32:1500:2000 --arch vit_nano --patch-size 8 --epochs 8 \
        --batch-size 64 --base-lr 4 --temperature 0.2 --warmup-epochs 1   # 2 CPU cores, ~1 min:
                                                                           # k-NN 28.6% -> 39-41%
    python simclr.py --data shapes:32:5000:2000 --arch vit_nano --patch-size 8 --batch-size 64 --proj-hidden 512 \
        --temperature 0.2 --base-lr 4 --epochs 6 --warmup-epochs 1 --knn-every 1 --workers 0
        # benchmarks/learning.py's recipe, ~4 min on one core: linear probe 29.5 -> 53.8% (+24.3 ± 1.6, 3 seeds)
    torchrun --nproc_per_node=8 simclr.py --data /imagenet                 # paper recipe

Paper: ResNet-50, batch 4096, 100 epochs -> 64.5% linear top-1 on ImageNet (Fig. B.1); 1000 -> 69.3%.
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
    p = argparse.ArgumentParser("simclr.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="shapes[:SIZE[:N[:V]]], cifar10, cifar100, stl10, or an ImageFolder root")
    g.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    g.add_argument("--image-size", type=common.positive_int, default=None, help="crop size (default: 224 for folders, 32 CIFAR, 96 STL-10)")
    g.add_argument("--color-jitter", type=float, default=1.0, help="jitter strength s (§B.5); the paper uses 0.5 on CIFAR")
    g.add_argument("--workers", type=common.non_negative_int, default=min(8, os.cpu_count()), help="data-loading processes per GPU")
    g.add_argument("--cpu-augment", action="store_true", help="augment in DataLoader workers even when the dataset fits on the device")
    common.add_data_args(g, crop_scale=(0.08, 1.0))  # --no-flip, --no-color, --grayscale-input, --mean, --std, --val, ...
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", choices=common.ARCHS, help="encoder")
    g.add_argument("--patch-size", type=common.positive_int, default=16, help="ViT patch size")
    g.add_argument("--init", default="", help="continued pre-training: the encoder starts from a torchvision ResNet or timm-named ViT "
                   "state_dict (official DINO, MAE, MoCo v3 files too) or a checkpoint of this project; the projector starts fresh")
    g.add_argument("--proj-hidden", type=common.positive_int, default=2048, help="projector hidden width")
    g.add_argument("--proj-dim", type=common.positive_int, default=128, help="projector output width (z)")
    g.add_argument("--temperature", type=common.positive_float, default=0.1, help="τ in NT-Xent; 0.1 is best for batch 4096 with LARS (Table 5)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=common.positive_int, default=100, help="training epochs (1000 for the paper's best)")
    g.add_argument("--warmup-epochs", type=common.non_negative_int, default=10, help="linear lr warm-up")
    g.add_argument("--batch-size", type=common.positive_int, default=4096, help="global batch, split over the GPUs")
    g.add_argument("--base-lr", type=float, default=0.3, help="lr = base-lr × batch-size / 256 (LARS)")
    g.add_argument("--weight-decay", type=float, default=1e-6, help="not on biases and BN parameters")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/simclr", help="checkpoint.pth and log.jsonl; resumes from it if present")
    g.add_argument("--resume", default="", help="resume from this checkpoint instead of OUTPUT_DIR/checkpoint.pth")
    g.add_argument("--save-every", type=common.non_negative_int, default=0, help="also keep OUTPUT_DIR/checkpoint_EPOCH.pth every N epochs (0: off)")
    g.add_argument("--keep", type=common.non_negative_int, default=0, help="with --save-every: keep only the last K numbered snapshots (0: all)")
    g.add_argument("--knn-every", type=common.non_negative_int, default=10, help="k-NN monitor on the val split every N epochs and at the end (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps, then faster)")
    return p


# ----------------------------------------------------------------------------- model
class SimCLR(nn.Module):
    """Encoder f and projector g: Linear-BN-ReLU-Linear-BN as in the official code. The output BN
    keeps its scale γ but has no shift β (official model_util.py linear_layer: center=use_bias=False),
    so z is centred over the batch and each dimension's learned γ weighs it in the cosine."""

    def __init__(self, encoder, proj_hidden, proj_dim):
        super().__init__()
        self.encoder = encoder
        self.projector = common.mlp([encoder.embed_dim, proj_hidden, proj_dim], last_affine=True)
        self.projector[-1].bias.requires_grad_(False)  # β stays 0: no optimizer ever sees it

    def forward(self, x):
        return self.projector(self.encoder(x))


# ----------------------------------------------------------------------------- objective
def info_nce(z1, z2, temperature):
    """NT-Xent over the 2N views; z1[i] and z2[i] (N, D) are the two views of image i."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)                  # (2N, D) on the unit sphere
    logits = z @ z.T / temperature                                       # (2N, 2N) cosine / τ
    logits.fill_diagonal_(float("-inf"))                                 # k ≠ i: a view is not its own negative
    n = len(z1)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # i <-> i + N
    # The official loss is loss_a + loss_b, each a mean over the N anchors of one view (objective.py,
    # add_contrastive_loss), i.e. twice the mean over 2N. LARS's trust ratio ignores the scale, but
    # biases and BN parameters (not adapted) would otherwise move at half the official rate.
    return 2 * F.cross_entropy(logits, positives)


# ----------------------------------------------------------------------------- training step
def training_step(model, views, args):
    x1, x2 = views
    # One forward for both views: BN statistics are over all 2N views, as in the paper.
    z1, z2 = model(torch.cat([x1, x2])).chunk(2)
    # Negatives come from every GPU, and the gather keeps gradients: each rank's loss also
    # pushes on the embeddings of the other ranks' images, so 8 × 512 computes what 1 × 4096 does.
    z1, z2 = common.all_gather(z1, keep_grad=True), common.all_gather(z2, keep_grad=True)
    return info_nce(z1, z2, args.temperature), z1


# ----------------------------------------------------------------------------- loop
def augmentations(args):
    """Two views from one distribution (§3, Appendix A): crop 0.08-1 + flip, colour jitter of strength s
    (p 0.8), grayscale (p 0.2), blur (p 0.5)."""
    s = args.color_jitter
    view = common.View(args.image_size, tuple(args.crop_scale), jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), interpolation="bicubic")  # data_util.py
    return common.domain_views(common.MultiView([view] * 2), args)  # --no-flip, --no-color, ... (default: the paper's)


def build_model(args):
    # Residual blocks start as the identity: the official resnet.py zero-initialises their last BN scale.
    encoder = common.build_encoder(args.arch, args.image_size, args.patch_size, zero_init_residual=True)
    common.load_encoder_weights(encoder, args)  # --init: continued pre-training from public weights
    return SimCLR(encoder, args.proj_hidden, args.proj_dim)


def main(args):
    dist_env = common.init_distributed()
    device = dist_env.device
    args.image_size = args.image_size or common.default_image_size(args.data)
    common.start_run(args, dist_env)  # flags argparse cannot check, OUTPUT_DIR writable: fail now, not after an epoch
    if args.batch_size % dist_env.world_size:
        raise common.UserError(f"--batch-size {args.batch_size} is not divisible by {dist_env.world_size} processes")
    dataset = common.build_dataset(args.data, "pretrain", augmentations(args), args.data_root, args.skip_bad_images)
    loader = common.make_loader(dataset, args.batch_size // dist_env.world_size, dist_env, args.workers,
                                on_device=not args.cpu_augment)
    if len(loader) == 0:
        raise common.UserError(f"{len(dataset)} images cannot fill one batch of {args.batch_size}")

    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    if args.arch.startswith("resnet") and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    lr = args.base_lr * args.batch_size / 256  # linear scaling rule (§B.1)
    optimizer = common.LARS(common.param_groups(model, args.weight_decay), lr=lr, momentum=0.9)
    encoder_config = dict(arch=args.arch, image_size=args.image_size, patch_size=args.patch_size)

    start_epoch, step, rng = 0, 0, None
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    resume_path = args.resume or (checkpoint_path if os.path.exists(checkpoint_path) else "")
    if resume_path:
        checkpoint = common.load_checkpoint(resume_path, "simclr")
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
        # SyncBN: with 512 images per GPU, per-GPU statistics would differ from the paper's
        # global-batch BN, and a rank could exploit its local statistics to spot positives.
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
    state = lambda **position: dict(method="simclr", encoder_config=encoder_config, encoder=raw_model.encoder.state_dict(),  # noqa: E731
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
            for group in optimizer.param_groups:
                group["lr"] = common.cosine_schedule(step, total_steps, lr, 0.0, warmup_steps)
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
                      lr=optimizer.param_groups[0]["lr"], images_per_s=len(losses) * args.batch_size / (time.time() - start))
        if dist_env.is_main and (warning := common.collapse_warning(record["embedding_std"], args.proj_dim)):
            print(warning)
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            record["knn_top1"] = knn()
        common.check_finite(record["loss"], epoch, step, record["lr"], raw_model)  # weights too, once an epoch
        if dist_env.is_main:
            common.save_checkpoint(state(epoch=epoch + 1, step=step), checkpoint_path)
            common.keep_snapshots(checkpoint_path, epoch + 1, args.save_every, args.keep)
            common.log_jsonl(os.path.join(args.output_dir, "log.jsonl"), record)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if v is not None))
    if dist_env.is_main and record.get("knn_top1") is not None:
        print(f"k-NN top-1 (k=20) on the val split: {100 * record['knn_top1']:.2f}%")
    if dist_env.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except common.UserError as error:
        sys.exit(common.error_line("simclr.py", error))  # exit code 1, printed once under torchrun
