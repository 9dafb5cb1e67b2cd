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
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------------- config
def get_args_parser():
    p = argparse.ArgumentParser("simsiam.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.data_args(p, crop_scale=(0.2, 1.0))  # --data, --image-size, --workers, the domain switches, ...
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", choices=common.ARCHS, help="encoder")
    g.add_argument("--patch-size", type=common.positive_int, default=16, help="ViT patch size")
    g.add_argument("--init", default="", help="continued pre-training: the encoder starts from a torchvision ResNet or "
                   "timm-named ViT state_dict (official DINO, MAE, MoCo v3 files too) or a checkpoint of this project; "
                   "projector and predictor start fresh")
    g.add_argument("--freeze-encoder-epochs", type=common.non_negative_int, default=0, metavar="N",
                   help="with --init: the encoder stays as loaded for N epochs while the fresh projector and "
                   "predictor learn, then all train: a random head's first large gradients would otherwise "
                   "wreck the loaded features (0: off, the paper's recipe)")
    g.add_argument("--proj-hidden", type=common.positive_int, default=2048,
                   help="projector hidden width (3 layers, BN after each)")
    g.add_argument("--proj-dim", type=common.positive_int, default=2048, help="projector output width (z)")
    g.add_argument("--pred-hidden", type=common.positive_int, default=512,
                   help="predictor bottleneck width (the predictor maps z to z's width)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=common.positive_int, default=100, help="training epochs (800 for the paper's best)")
    g.add_argument("--warmup-epochs", type=common.non_negative_int, default=0,
                   help="linear lr warm-up (the paper has none at batch 512)")
    g.add_argument("--batch-size", type=common.positive_int, default=512, help="global batch, split over the GPUs")
    g.add_argument("--base-lr", type=float, default=0.05, help="lr = base-lr × batch-size / 256 (SGD)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="on every parameter, as in the official code")
    g.add_argument("--fix-pred-lr", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the predictor at the initial lr while the rest decays (§4.2: slightly better, 68.1%%)")
    common.run_args(p, "simsiam")  # --output-dir, --resume, --knn-every, --seed, --compile, ...
    return p


# ----------------------------------------------------------------------------- model
class SimSiam(nn.Module):
    """Encoder + projector f (3 Linear layers, BN after each, the last BN without affine) and a
    bottleneck predictor h, Linear(512)-BN-ReLU-Linear with no BN on the output (§3, Baseline settings)."""

    def __init__(self, encoder, proj_hidden, proj_dim, pred_hidden):
        super().__init__()
        self.encoder = encoder
        self.projector = common.mlp([encoder.embed_dim, proj_hidden, proj_hidden, proj_dim], last_bn=True)
        self.predictor = common.mlp([proj_dim, pred_hidden, proj_dim], last_bn=False, last_bias=True)  # official

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
    view = common.View(args.image_size, tuple(args.crop_scale), jitter=(0.4, 0.4, 0.4, 0.1), blur=0.5)
    views = common.MultiView([view] * 2)
    return common.domain_views(views, args)  # --no-flip, --no-color, ... (default: the paper's)


def build_model(args):
    # Residual blocks start as the identity (official builder.py: base_encoder(zero_init_residual=True)).
    encoder = common.build_encoder(args.arch, args.image_size, args.patch_size, zero_init_residual=True)
    common.load_encoder_weights(encoder, args)  # --init: continued pre-training from public weights
    return SimSiam(encoder, args.proj_hidden, args.proj_dim, args.pred_hidden)


def main(args):
    run = common.Run(args, "simsiam")  # torchrun's ranks, start checks, OUTPUT_DIR
    if args.batch_size // run.world_size < 2:  # BN in the heads normalises over the images of each GPU
        raise common.UserError(f"--batch-size {args.batch_size}: BatchNorm needs at least 2 images per process")
    loader = run.loader(augmentations(args))
    torch.manual_seed(args.seed)
    model = build_model(args).to(run.device)
    lr = args.base_lr * args.batch_size / 256  # linear scaling rule (§3, baseline settings)
    encoder_and_projector = [*model.encoder.parameters(), *model.projector.parameters()]
    optimizer = torch.optim.SGD([{"params": encoder_and_projector, "fix_lr": False},
                                 {"params": model.predictor.parameters(), "fix_lr": args.fix_pred_lr}],
                                lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    # SyncBN: BN statistics over the global batch of each view, as in the paper; per-GPU statistics of small shards
    # would be noisier and change with the number of GPUs.
    ddp_model = run.prepare(model, optimizer, encoder=model.encoder, sync_bn=True)  # resume, DDP, k-NN at init

    total_steps, warmup_steps = args.epochs * len(loader), args.warmup_epochs * len(loader)
    for epoch in run.epochs():
        for views in run.batches(loader):
            # The cosine moves once per epoch, as the official adjust_learning_rate (main_simsiam.py); only a warm-up
            # (none in the paper) ramps per step.
            at = run.step if run.step < warmup_steps else epoch * len(loader)
            for group in optimizer.param_groups:
                # --fix-pred-lr (§4.2): the predictor keeps adapting to the latest representations.
                group["lr"] = lr if group["fix_lr"] else common.cosine_schedule(at, total_steps, lr, 0.0, warmup_steps)
            with torch.autocast(run.device.type, torch.bfloat16, enabled=run.device.type == "cuda"):
                loss, z = training_step(ddp_model, views, args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if epoch < args.freeze_encoder_epochs:  # no gradient: the optimizer leaves the --init weights alone
                model.encoder.zero_grad(set_to_none=True)  # while the fresh heads settle (no decay, no momentum)
            optimizer.step()
            run.step_done(loss, z)  # progress, divergence and SIGTERM stops
        run.epoch_done()  # k-NN, checkpoint, log
    run.finish()


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except common.UserError as error:
        sys.exit(common.error_line("simsiam.py", error))  # exit code 1, printed once under torchrun
