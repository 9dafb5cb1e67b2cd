r"""BYOL: bootstrap your own latent (Grill et al., NeurIPS 2020, arXiv:2006.07733).

No negatives. An online network (encoder f, projector g, predictor q) sees one view and predicts the
target network's projection z' of the other view; the target (f', g') is not trained but trails the
online weights as an exponential moving average, ξ ← τξ + (1 − τ)θ (§3.1):

    L = ‖q(z1)/‖q(z1)‖ − sg(z'2)/‖z'2‖‖² = 2 − 2·cos(q(z1), sg(z'2)),   plus the same with 1 <-> 2

What prevents collapse (every image -> one constant, which would make L zero): the stop-gradient
sg and the slow EMA mean the target is never pulled towards the online outputs, so the online net
must predict a moving, informative target; the predictor q must stay near-optimal for that (§3.2).
Each epoch logs embedding_std (SimSiam §4.1; ≈ 1/√d healthy, → 0 collapsed) and warns when it falls.

    python byol.py --data shapes:32:1000:2000 --arch vit_nano --patch-size 8 --epochs 24 --batch-size 64 \
        --proj-hidden 256 --proj-dim 64 --pred-hidden 256 --base-lr 4 --tau-base 0.99 --warmup-epochs 2 --knn-every 2
        # CPU, ~2 min: k-NN 25.8 -> 22.4% (epoch 4: chasing a random target) -> 31.0% (epoch 14) -> 29.8%
    python byol.py --data shapes:32:5000:2000 --arch vit_nano --patch-size 8 --batch-size 64 --proj-hidden 512 \
        --proj-dim 128 --pred-hidden 512 --base-lr 4 --tau-base 0.99 --epochs 6 --warmup-epochs 1 --knn-every 1 \
        --workers 0
        # benchmarks/learning.py's recipe, ~5 min on one core: linear probe 29.5 -> 42.1% (+12.7 ± 1.2, 3 seeds)
    torchrun --nproc_per_node=8 byol.py --data /imagenet                                      # paper recipe

Paper: ResNet-50, batch 4096, 1000 epochs -> 74.3% linear top-1 on ImageNet (Table 1).
"""
import argparse
import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------------- config
def get_args_parser():
    p = argparse.ArgumentParser("byol.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.data_args(p, crop_scale=(0.08, 1.0))  # --data, --image-size, --workers, the domain switches, ...
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", choices=common.ARCHS, help="encoder")
    g.add_argument("--patch-size", type=common.positive_int, default=16, help="ViT patch size")
    g.add_argument("--init", default="", help="continued pre-training: the encoder starts from a torchvision ResNet or "
                   "timm-named ViT state_dict (official DINO, MAE, MoCo v3 files too) or a checkpoint of this project; "
                   "the target starts equal to it, the heads fresh")
    g.add_argument("--freeze-encoder-epochs", type=common.non_negative_int, default=0, metavar="N",
                   help="with --init: the encoder stays as loaded for N epochs while the fresh projector and "
                   "predictor learn, then all train: a random head's first large gradients would otherwise "
                   "wreck the loaded features (0: off, the paper's recipe)")
    g.add_argument("--proj-hidden", type=common.positive_int, default=4096, help="projector hidden width")
    g.add_argument("--proj-dim", type=common.positive_int, default=256, help="projector output width (z)")
    g.add_argument("--pred-hidden", type=common.positive_int, default=4096,
                   help="predictor hidden width (the predictor maps z to z's width)")
    g.add_argument("--tau-base", type=float, default=0.996, help="target EMA rate τ at step 0; rises to 1 on a cosine "
                   "(§3.3). Lower it for short runs (0.99; 0.9 for a few hundred steps on CPU): the target follows "
                   "faster")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=common.positive_int, default=1000, help="training epochs; the official presets "
                   "(configs/byol.py) for 300 epochs are --base-lr 0.3 --weight-decay 1e-6 --tau-base 0.99 (100: 0.45, "
                   "1e-6, 0.99)")
    g.add_argument("--warmup-epochs", type=common.non_negative_int, default=10, help="linear lr warm-up")
    g.add_argument("--batch-size", type=common.positive_int, default=4096, help="global batch, split over the GPUs")
    g.add_argument("--base-lr", type=float, default=0.2, help="lr = base-lr × batch-size / 256 (LARS)")
    g.add_argument("--weight-decay", type=float, default=1.5e-6, help="not on biases and BN parameters")
    common.run_args(p, "byol")  # --output-dir, --resume, --knn-every, --seed, --compile, ...
    return p


# ----------------------------------------------------------------------------- model
class BYOL(nn.Module):
    """Online network: encoder f, projector g and predictor q, both MLPs Linear(4096)-BN-ReLU-Linear(256)
    with no BN and no bias on the output (§3.3; official utils/networks.py MLP: with_bias=False).
    Target network: a copy of f and g that gradients never reach."""

    def __init__(self, encoder, proj_hidden, proj_dim, pred_hidden):
        super().__init__()
        self.encoder = encoder
        self.projector = common.mlp([encoder.embed_dim, proj_hidden, proj_dim], last_bn=False)
        self.predictor = common.mlp([proj_dim, pred_hidden, proj_dim], last_bn=False)
        self.target = copy.deepcopy(nn.Sequential(self.encoder, self.projector)).requires_grad_(False)

    def forward(self, x1, x2):
        """Online predictions p = q(g(f(x))) and target projections z' = g'(f'(x)) of both views.
        Each view is its own forward, so BN statistics are per view, as in the official code."""
        online = lambda x: self.predictor(self.projector(self.encoder(x)))
        with torch.no_grad():  # the target is only ever averaged, never differentiated
            z1, z2 = self.target(x1), self.target(x2)
        return online(x1), online(x2), z1, z2


@torch.no_grad()
def momentum_update(model, momentum):
    """ξ ← τ·ξ + (1 − τ)·θ (Eq. 1): the target's f' and g' trail the online f and g. BN running
    statistics are not averaged: in training the target normalises with its own batch statistics."""
    online = [*model.encoder.parameters(), *model.projector.parameters()]  # same order as target.{0,1}
    torch._foreach_lerp_(list(model.target.parameters()), online, 1 - momentum)


# ----------------------------------------------------------------------------- objective
def regression_loss(p, z):
    """Normalised MSE ‖p/‖p‖ − z/‖z‖‖² = 2 − 2·cos(p, z) (Eq. 2), mean over the batch. z comes from
    the target: .detach() is the paper's stop-gradient sg(z'), so only the online side learns."""
    p, z = F.normalize(p.float(), dim=1), F.normalize(z.detach().float(), dim=1)  # (N, D) unit vectors
    return (2 - 2 * (p * z).sum(dim=1)).mean()


# ----------------------------------------------------------------------------- training step
def training_step(model, views, args):
    p1, p2, z1, z2 = model(*views)
    # No gather: unlike SimCLR's, each image's loss involves only its own two views, so the mean
    # over a GPU's images plus DDP's average of the gradients is the global batch's step.
    # Symmetrised by summing (§3.1): view 1 predicts view 2's target and vice versa, so L ∈ [0, 8].
    loss = regression_loss(p1, z2) + regression_loss(p2, z1)
    return loss, z1  # z1 (target projection) carries the collapse signal: the online net chases it


# ----------------------------------------------------------------------------- loop
def augmentations(args):
    """Asymmetric views (Table 6): view 1 always blurred, never solarised; view 2 rarely blurred, sometimes
    solarised."""
    views = [common.View(args.image_size, tuple(args.crop_scale), (0.4, 0.4, 0.2, 0.1), blur, solarize,
                         interpolation="bicubic")
             for blur, solarize in ((1.0, 0.0), (0.1, 0.2))]  # bicubic resize, as the official utils/dataset.py
    return common.domain_views(common.MultiView(views), args)  # --no-flip, --no-color, ... (default: the paper's)


def build_model(args):
    # Residual blocks start as the identity (haiku's ResNet BlockV1, which BYOL uses: last BN scale_init zeros).
    encoder = common.build_encoder(args.arch, args.image_size, args.patch_size, zero_init_residual=True)
    common.load_encoder_weights(encoder, args)  # --init: before BYOL() copies the target, so both start equal
    return BYOL(encoder, args.proj_hidden, args.proj_dim, args.pred_hidden)


def main(args):
    run = common.Run(args, "byol")  # torchrun's ranks, start checks, OUTPUT_DIR
    if args.batch_size // run.world_size < 2:  # BN in the heads normalises over the images of each GPU
        raise common.UserError(f"--batch-size {args.batch_size}: BatchNorm needs at least 2 images per process")
    if not 0 <= args.tau_base <= 1:
        raise common.UserError(f"--tau-base {args.tau_base} is not in [0, 1] (1: the target never moves)")
    loader = run.loader(augmentations(args))
    torch.manual_seed(args.seed)
    model = build_model(args).to(run.device)
    lr = args.base_lr * args.batch_size / 256  # linear scaling rule (§3.3)
    optimizer = common.LARS(common.param_groups(model, args.weight_decay), lr=lr, momentum=0.9)  # online only
    # SyncBN: BN statistics over the global batch of each view, as in the paper; per-GPU statistics of small shards
    # would be noisier and change with the number of GPUs.
    ddp_model = run.prepare(model, optimizer, encoder=model.encoder, sync_bn=True)  # resume, DDP, k-NN at init

    total_steps, warmup_steps = args.epochs * len(loader), args.warmup_epochs * len(loader)
    for epoch in run.epochs():
        for views in run.batches(loader):
            for group in optimizer.param_groups:
                group["lr"] = common.cosine_schedule(run.step, total_steps, lr, 0.0, warmup_steps)
            # τ = 1 − (1 − τ_base)(cos(πk/K) + 1)/2 (§3.3): a cosine from τ_base at k = 0 to 1 at k = K.
            momentum = common.cosine_schedule(run.step, total_steps, args.tau_base, 1.0)
            with torch.autocast(run.device.type, torch.bfloat16, enabled=run.device.type == "cuda"):
                loss, z = training_step(ddp_model, views, args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if epoch < args.freeze_encoder_epochs:  # no gradient: the optimizer leaves the --init weights alone
                model.encoder.zero_grad(set_to_none=True)  # while the fresh heads settle (no decay, no momentum)
            optimizer.step()
            momentum_update(model, momentum)  # after the online step, at the τ of this step k
            run.step_done(loss, z)  # progress, divergence and SIGTERM stops
        run.epoch_done(momentum=momentum)  # k-NN, checkpoint, log
    run.finish()


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except common.UserError as error:
        sys.exit(common.error_line("byol.py", error))  # exit code 1, printed once under torchrun
