r"""MAE: masked autoencoders are scalable vision learners (He et al., CVPR 2022, arXiv:2111.06377).

Cut the image into L patches, hide a random 75% of them, and paint the hidden pixels back. The ViT
encoder runs on the L/4 visible patches only (no mask tokens: a quarter of the sequence, a quarter
of the cost); a small decoder gets the encoded patches plus a learned mask token at every hidden
position and predicts pixels. The loss is the MSE on the hidden patches only (§3), with each
target patch standardised by its own mean and variance:

    loss = 1/|M| Σ_{i ∈ M} mean_pixels (pred_i − (x_i − μ(x_i)) / σ(x_i))²,    M = the removed patches

The decoder is thrown away; the encoder (a plain ViT, timm names) is what probe.py evaluates.

    python mae.py --data shapes:16:2000:2000 --arch vit_nano --patch-size 4 --decoder-dim 64 --decoder-depth 1 \
        --decoder-heads 4 --batch-size 32 --base-lr 0.016 --epochs 4 --warmup-epochs 1    # CPU, ~1 minute
    python mae.py --data shapes:32:5000:2000 --arch vit_nano --patch-size 4 --batch-size 64 --decoder-dim 64 \
        --decoder-depth 2 --decoder-heads 4 --base-lr 1.5e-3 --epochs 15 --warmup-epochs 1 --knn-every 2 --workers 0
    python probe.py runs/mae/checkpoint.pth --data shapes:32:5000:2000 --protocol finetune \
        --finetune-epochs 10 --finetune-batch-size 64 --finetune-base-lr 5e-3
        # benchmarks/learning.py's recipe, ~10 min on one core + ~6 min of fine-tuning: fine-tuned from MAE vs from
        # its random init 63.3 vs 47.0, 67.6 vs 57.1, 60.7 vs 43.1% (seeds 0-2: +14.8 ± 3.8); on 2000 images
        # (39 epochs) +16.1 ± 1.2. Half as many steps gained +4.0 ± 3.5 there, k-NN still below init. At patch 8
        # (4 of 16 patches visible) MAE hurt (49.2 vs 53.7%). The random init is mae.py's own (Xavier, sin-cos),
        # as benchmarks/learning.py builds it; probe.py's --baselines fine-tunes its own init, which stays near
        # chance at this lr (17%).
    torchrun --nproc_per_node=8 mae.py --data /imagenet --epochs 1600                    # paper recipe

The first command's loss falls (1.07 -> 0.83) and OUTPUT_DIR/reconstruction_*.png shows the hidden patches
filled in (blurry), while the CLS k-NN falls (38 -> 14%): MAE is read out by fine-tuning (Fig. 9).
Paper: ViT-L/16, 800 epochs -> 84.9% fine-tuned, 73.5% linear top-1 on ImageNet (Table 1 defaults);
ViT-B/16, 1600 epochs -> 83.6% fine-tuned. k-NN / linear are weak for MAE: fine-tune it.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn as nn
import torchvision

import common


# ----------------------------------------------------------------------------- config
def get_args_parser():
    p = argparse.ArgumentParser("mae.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.data_args(p, crop_scale=(0.2, 1.0))  # --data, --image-size, --workers, the domain switches, ...
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_base", choices=list(common.VIT_SIZES), help="ViT encoder")
    g.add_argument("--patch-size", type=common.positive_int, default=16,
                   help="ViT patch size (the unit that is masked and predicted)")
    g.add_argument("--init", default="", help="continued pre-training: the encoder starts from a torchvision ResNet or "
                   "timm-named ViT state_dict (official DINO, MAE, MoCo v3 files too) or a checkpoint of this project; "
                   "the decoder starts fresh")
    g.add_argument("--freeze-encoder-epochs", type=common.non_negative_int, default=0, metavar="N",
                   help="with --init: the encoder stays as loaded for N epochs while the fresh decoder learns, "
                   "then all train: a random head's first large gradients would otherwise wreck the loaded "
                   "features (0: off, the paper's recipe)")
    g.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches removed; 0.75 is best for both "
                   "fine-tuning and linear probing (Fig. 5), BERT's 0.15 is far too easy for images")
    g.add_argument("--decoder-dim", type=common.positive_int, default=512, help="decoder width (Table 1b: 512)")
    g.add_argument("--decoder-depth", type=common.positive_int, default=8, help="decoder blocks; a deep decoder "
                   "matters for linear probing (Table 1a: 8), 1 block is enough for fine-tuning")
    g.add_argument("--decoder-heads", type=common.positive_int, default=16, help="decoder attention heads")
    g.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="predict per-patch standardised pixels (Table 1c: better than raw pixels); "
                        "--no-norm-pix-loss predicts raw (ImageNet-normalised) pixels")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=common.positive_int, default=800,
                   help="training epochs (1600 for the paper's best; longer keeps helping)")
    g.add_argument("--warmup-epochs", type=common.non_negative_int, default=40, help="linear lr warm-up")
    g.add_argument("--batch-size", type=common.positive_int, default=4096, help="global batch, split over the GPUs")
    g.add_argument("--base-lr", type=float, default=1.5e-4, help="lr = base-lr × batch-size / 256 (AdamW)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="not on biases and norm parameters")
    g = common.run_args(p, "mae")  # --output-dir, --resume, --knn-every, --seed, --compile, ...
    g.add_argument("--visualize", type=common.non_negative_int, default=20, help="every N epochs and at the end, write "
                   "OUTPUT_DIR/reconstruction_EPOCH.png: original | masked | reconstruction of 8 fixed val images "
                   "(0: off)")
    return p


# ----------------------------------------------------------------------------- model
def patchify(imgs, p):
    """(B, 3, H, W) -> (B, L, p·p·3): patches in raster order (the encoder's token order), each one
    flattened as (row, column, channel)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)                               # (B, 3, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)  # (B, h·w, p·p·3)


def unpatchify(x, p):
    """(B, L, p·p·3) -> (B, 3, H, W), the inverse of patchify for a square grid."""
    B, L, _ = x.shape
    h = math.isqrt(L)
    x = x.reshape(B, h, h, p, p, 3)                                            # (B, h, w, p, p, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, 3, h * p, h * p)             # (B, 3, h·p, w·p)


def random_masking(x, mask_ratio, noise=None):
    """Per-sample random masking: argsort of uniform noise shuffles each sample's L tokens on its
    own, and the first int(L·(1 − r)) of the shuffle are kept. x (B, L, D) -> kept tokens
    (B, L_keep, D), mask (B, L) with 1 = removed, and ids_restore (B, L) that undoes the shuffle."""
    B, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    ids_shuffle = noise.argsort(dim=1)                                         # (B, L): small noise first = kept
    ids_restore = ids_shuffle.argsort(dim=1)                                   # (B, L): each token's place in it
    kept = x.gather(1, ids_shuffle[:, :len_keep, None].expand(-1, -1, D))      # (B, L_keep, D)
    mask = (ids_restore >= len_keep).float()                                   # (B, L), image order: 1 = removed
    return kept, mask, ids_restore


class MAE(nn.Module):
    """A ViT encoder (fixed 2-D sin-cos positions) and a lightweight ViT decoder to pixels."""

    def __init__(self, encoder, decoder_dim, decoder_depth, decoder_heads):
        super().__init__()
        self.encoder, p = encoder, encoder.patch_size
        grid = math.isqrt(encoder.pos_embed.shape[1] - 1)
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))  # one shared, learned vector
        self.register_buffer("decoder_pos_embed", common.sincos_pos_embed(decoder_dim, grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(common.Block(decoder_dim, decoder_heads, 4.0, 0.0)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * 3)  # one patch's pixels
        # The official initialisation (after the JAX ViT): Xavier-uniform for every linear map, the
        # patch embedding too (a linear map on flattened patches), N(0, 0.02) for the tokens.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(encoder.patch_embed.proj.weight.data.view(encoder.embed_dim, -1))
        nn.init.normal_(encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, imgs, mask_ratio, noise=None):
        tokens = self.encoder.embed(imgs)                                      # (B, L, D) patches + positions
        visible, mask, ids_restore = random_masking(tokens, mask_ratio, noise)  # (B, L_keep, D), L_keep = L/4
        # The asymmetry: the encoder runs on the visible quarter only (+ CLS) and never sees a mask token.
        latent = self.encoder.forward_tokens(visible)                          # (B, 1 + L_keep, D)
        return self.decode(latent, ids_restore), mask, latent

    def decode(self, latent, ids_restore):
        x = self.decoder_embed(latent)                                         # (B, 1 + L_keep, Dd)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)        # (B, L − L_keep, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)                         # (B, L, Dd) in shuffled order
        x_ = x_.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))   # (B, L, Dd) back in image order
        # Positions are added after unshuffling, so each mask token learns where its hole is.
        x = torch.cat([x[:, :1], x_ + self.decoder_pos_embed], dim=1)          # (B, 1 + L, Dd), CLS kept
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]                  # (B, L, p·p·3), CLS dropped


# ----------------------------------------------------------------------------- objective
def mae_loss(target, pred, mask, norm_pix_loss=True):
    """target, pred (B, L, p·p·3) patches; mask (B, L), 1 = removed. MSE on the removed patches only:
    reconstructing visible pixels would be copying, and costs accuracy (§3, 'Reconstruction target')."""
    if norm_pix_loss:  # per-patch standardisation: local contrast becomes the target (Table 1c)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5                         # 1e-6 keeps flat patches finite
    loss = ((pred.float() - target) ** 2).mean(dim=-1)                         # (B, L) mean error per patch
    return (loss * mask).sum() / mask.sum()                                    # mean over the removed patches


# ----------------------------------------------------------------------------- training step
def training_step(model, views, args, noise=None):
    imgs = views[0]
    pred, mask, latent = model(imgs, args.mask_ratio, noise)
    # No collective: every image hides the same number of patches, so each rank's mean is over
    # equally many patches and DDP's gradient average is exactly the global-batch gradient.
    loss = mae_loss(patchify(imgs, args.patch_size), pred, mask, args.norm_pix_loss)
    return loss, latent[:, 0]  # collapse signal: the CLS feature of the visible patches


@torch.no_grad()
def visualize(model, imgs, noise, args, path):
    """One row per image: original | masked input (grey holes) | reconstruction. With --norm-pix-loss
    the prediction is in per-patch standardised units; like the official demo's 'reconstruction +
    visible' we show it with each patch's true mean and std put back, so a hidden patch's average
    colour is borrowed from the original and only its content is the model's; visible patches are
    pasted back (the loss never asks the decoder to get them right)."""
    was_training = model.training
    model.eval()
    pred, mask, _ = model(imgs, args.mask_ratio, noise)
    target = patchify(imgs, args.patch_size)                                   # (n, L, p·p·3)
    pred = pred.float()
    if args.norm_pix_loss:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    mask = mask[..., None]                                                     # (n, L, 1)
    masked = unpatchify(target * (1 - mask), args.patch_size)                  # 0: the mean colour, de-normalised
    reconstruction = unpatchify(target * (1 - mask) + pred * mask, args.patch_size)
    rows = torch.stack([imgs, masked, reconstruction], dim=1).flatten(0, 1)    # (3n, 3, H, W): row-major triplets
    mean, std = (torch.tensor(s, device=imgs.device).view(1, 3, 1, 1) for s in (args.mean, args.std))
    torchvision.utils.save_image((rows * std + mean).clamp(0, 1), path, nrow=3)
    model.train(was_training)


# ----------------------------------------------------------------------------- loop
def augmentations(args):
    """Masking is the augmentation, so only crop (0.2-1, bicubic) and flip: no colour, no blur."""
    view = common.View(args.image_size, tuple(args.crop_scale), blur=0.0, jitter_prob=0.0, grayscale_prob=0.0,
                       interpolation="bicubic")
    views = common.MultiView([view])
    return common.domain_views(views, args)  # --no-flip, --grayscale-input, --mean/--std


def build_model(args):
    encoder = common.build_encoder(args.arch, args.image_size, args.patch_size, sincos=True)
    if args.decoder_dim % args.decoder_heads or args.decoder_dim % 4:
        raise common.UserError(f"--decoder-dim {args.decoder_dim} must be a multiple of 4 and of --decoder-heads "
                               f"{args.decoder_heads}")
    model = MAE(encoder, args.decoder_dim, args.decoder_depth, args.decoder_heads)
    common.load_encoder_weights(model.encoder, args)  # --init: after MAE's own init, which would overwrite it
    if model.encoder.num_prefix_tokens > 1:  # the masking and the decoder take token 0 as the only non-patch token
        raise common.UserError(f"--init {args.init}: MAE keeps no register tokens; take a file without (DINOv2's "
                               "dinov2_vit*14_pretrain.pth, not *_reg4_pretrain.pth)")
    return model


def main(args):
    run = common.Run(args, "mae")  # torchrun's ranks, start checks, OUTPUT_DIR
    num_patches = (args.image_size // args.patch_size) ** 2
    if not 0 < args.mask_ratio < 1 or int(num_patches * (1 - args.mask_ratio)) < 1:
        raise common.UserError(f"--mask-ratio {args.mask_ratio} must be in (0, 1) and keep at least one of "
                               f"{num_patches} patches")
    loader = run.loader(augmentations(args))
    torch.manual_seed(args.seed)
    model = build_model(args).to(run.device)
    lr = args.base_lr * args.batch_size / 256  # linear scaling rule (§A.1)
    optimizer = torch.optim.AdamW(common.param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95),
                                  fused=run.device.type == "cuda")  # β2 = 0.95 as in iGPT (§A.1)
    if args.visualize and run.is_main:  # the same 8 images and the same masks every time
        transform = common.eval_transform(args.image_size, args.mean, args.std, args.grayscale_input)
        split = "val" if common.has_split(args.data) else "train"
        shown = common.build_dataset(args.data, split, transform, args.data_root, args.skip_bad_images)
        shown = torch.stack([shown[i][0] for i in range(min(8, len(shown)))]).to(run.device)
        noise = torch.rand(len(shown), num_patches, generator=torch.Generator().manual_seed(0)).to(run.device)
    # No BatchNorm anywhere in MAE: nothing to synchronise but gradients.
    ddp_model = run.prepare(model, optimizer, encoder=model.encoder, sync_bn=False)  # resume, DDP, k-NN at init

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
        if run.is_main and run.due(args.visualize):
            with torch.autocast(run.device.type, torch.bfloat16, enabled=run.device.type == "cuda"):
                path = os.path.join(args.output_dir, f"reconstruction_{epoch + 1:04d}.png")
                visualize(model, shown, noise, args, path)
    run.finish()


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except common.UserError as error:
        sys.exit(common.error_line("mae.py", error))  # exit code 1, printed once under torchrun
