r"""SimCLR: contrastive learning of visual representations (Chen et al., ICML 2020, arXiv:2002.05709).

Two random views of every image go through an encoder f and a projector g, z = g(f(x)). Each view must pick out
its partner among the 2N views of the batch (NT-Xent, §2.1):

    l(i, j) = -log  exp(sim(z_i, z_j) / τ)  /  Σ_{k ≠ i} exp(sim(z_i, z_k) / τ),   sim = cosine

averaged over all 2N anchors. More negatives help, so under DDP the batch is the *global* one. f(x) is kept for
downstream tasks; g is thrown away (§4.2: f's features are better than z's).

    python simclr.py --data shapes:32:1500:2000 --arch vit_nano --patch-size 8 --epochs 8 \
        --batch-size 64 --base-lr 4 --temperature 0.2 --warmup-epochs 1   # 2 CPU cores, ~1 min: k-NN 28.6% -> 39-41%
    python simclr.py --data shapes:32:5000:2000 --arch vit_nano --patch-size 8 --batch-size 64 --proj-hidden 512 \
        --temperature 0.2 --base-lr 4 --epochs 6 --warmup-epochs 1 --knn-every 1 --workers 0
        # benchmarks/learning.py's recipe, ~4 min on one core: linear probe 29.5 -> 53.8% (+24.3 ± 1.6, 3 seeds)
    torchrun --nproc_per_node=8 simclr.py --data /imagenet                 # paper recipe

Paper: ResNet-50, batch 4096, 100 epochs -> 64.5% linear top-1 on ImageNet (Fig. B.1); 1000 -> 69.3%.
"""
import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------------- config
def get_args_parser():
    p = argparse.ArgumentParser("simclr.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = common.data_args(p, crop_scale=(0.08, 1.0))  # --data, --image-size, --workers, the domain switches, ...
    g.add_argument("--color-jitter", type=float, default=1.0, help="jitter strength s (§B.5; CIFAR: 0.5)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", choices=common.ARCHS, help="encoder")
    g.add_argument("--patch-size", type=common.positive_int, default=16, help="ViT patch size")
    g.add_argument("--init", default="", help="continued pre-training: the encoder starts from a torchvision ResNet or "
                   "timm-named ViT state_dict (official DINO, MAE, MoCo v3 files too) or a checkpoint of this project; "
                   "the projector starts fresh")
    g.add_argument("--freeze-encoder-epochs", type=common.non_negative_int, default=0, metavar="N",
                   help="with --init: the encoder stays as loaded for N epochs while the fresh projector learns, "
                   "then all train: a random head's first large gradients would otherwise wreck the loaded "
                   "features (0: off, the paper's recipe)")
    g.add_argument("--proj-hidden", type=common.positive_int, default=2048, help="projector hidden width")
    g.add_argument("--proj-dim", type=common.positive_int, default=128, help="projector output width (z)")
    g.add_argument("--temperature", type=common.positive_float, default=0.1,
                   help="τ in NT-Xent; 0.1 is best for batch 4096 with LARS (Table 5)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=common.positive_int, default=100, help="training epochs (the paper's best: 1000)")
    g.add_argument("--warmup-epochs", type=common.non_negative_int, default=10, help="linear lr warm-up")
    g.add_argument("--batch-size", type=common.positive_int, default=4096, help="global batch, split over the GPUs")
    g.add_argument("--base-lr", type=float, default=0.3, help="lr = base-lr × batch-size / 256 (LARS)")
    g.add_argument("--weight-decay", type=float, default=1e-6, help="not on biases and BN parameters")
    common.run_args(p, "simclr")  # --output-dir, --resume, --knn-every, --seed, --compile, ...
    return p


# ----------------------------------------------------------------------------- model
class SimCLR(nn.Module):
    """Encoder f and projector g: Linear-BN-ReLU-Linear-BN as in the official code. The output BN keeps its scale γ
    but has no shift β (official model_util.py linear_layer: center=use_bias=False), so z is centred over the batch
    and each dimension's learned γ weighs it in the cosine."""

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
    # fp32 even under bf16 autocast (which would run this matmul in bf16 despite .float()): bf16 rounds
    # logits of 8-16 (cosine / τ at τ = 0.1) to steps of 1/16, coarser than the gaps the loss ranks.
    with torch.autocast(z.device.type, enabled=False):
        logits = z @ z.T / temperature                                   # (2N, 2N) cosine / τ
    logits.fill_diagonal_(float("-inf"))                                 # k ≠ i: a view is not its own negative
    n = len(z1)
    positives = torch.arange(n, 3 * n, device=z.device) % (2 * n)        # i <-> i + N (built on the device)
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
    (p 0.8), grayscale (p 0.2), blur (p 0.5); bicubic resize, as the official data_util.py."""
    s = args.color_jitter
    view = common.View(args.image_size, tuple(args.crop_scale), jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
                       interpolation="bicubic")
    return common.domain_views(common.MultiView([view] * 2), args)  # --no-flip, --no-color, ... (default: the paper's)


def build_model(args):
    # Residual blocks start as the identity: the official resnet.py zero-initialises their last BN scale.
    encoder = common.build_encoder(args.arch, args.image_size, args.patch_size, zero_init_residual=True)
    common.load_encoder_weights(encoder, args)  # --init: continued pre-training from public weights
    return SimCLR(encoder, args.proj_hidden, args.proj_dim)


def main(args):
    run = common.Run(args, "simclr")  # torchrun's ranks, start checks, OUTPUT_DIR
    loader = run.loader(augmentations(args))
    torch.manual_seed(args.seed)
    model = build_model(args).to(run.device)
    lr = args.base_lr * args.batch_size / 256  # linear scaling rule (§B.1)
    optimizer = common.LARS(common.param_groups(model, args.weight_decay), lr=lr, momentum=0.9)
    # SyncBN: with 512 images per GPU, per-GPU statistics would differ from the paper's global-batch BN, and a rank
    # could exploit its local statistics to spot positives.
    ddp_model = run.prepare(model, optimizer, encoder=model.encoder, sync_bn=True)  # resume, DDP, k-NN at init

    total_steps, warmup_steps = args.epochs * len(loader), args.warmup_epochs * len(loader)
    for epoch in run.epochs():
        for views in run.batches(loader):
            for group in optimizer.param_groups:
                group["lr"] = common.cosine_schedule(run.step, total_steps, lr, 0.0, warmup_steps)
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
        sys.exit(common.error_line("simclr.py", error))  # exit code 1, printed once under torchrun
