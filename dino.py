r"""DINO: self-distillation with no labels (Caron et al., ICCV 2021, arXiv:2104.14294).

A student network g_s learns to predict the output of a teacher g_t, an exponential moving average
of the student, on other crops of the same image. Both end in a K-way softmax (§3.1):

    L = Σ_{x ∈ {x1g, x2g}} Σ_{x' ∈ V, x' ≠ x}  H(P_t(x), P_s(x')),   H(a, b) = -a · log b
    P_t(x) = softmax((g_t(x) - c) / τ_t),   P_s(x') = softmax(g_s(x') / τ_s),   c ← m c + (1 - m) mean g_t

The teacher sees the 2 global crops, the student all of them (multi-crop: + N small local crops), so
local-to-global correspondence is learnt. Centering (c) alone would collapse to the uniform
distribution and sharpening (τ_t < τ_s) alone to one dimension; together they avoid both (§5.3).

    python dino.py --data shapes:32:5000:2000 --arch vit_nano --patch-size 8 --batch-size 64 --out-dim 1024 \
        --head-hidden 512 --head-bottleneck 128 --local-crops 0 --global-crops-scale 0.14 1 --base-lr 4e-3 \
        --momentum-teacher 0.99 --freeze-last-layer 0 --epochs 6 --warmup-epochs 1 --knn-every 1 --workers 0
        # CPU, ~5 min on one core (benchmarks/learning.py's recipe): linear probe 29.5 -> 44.4% (+14.9 ± 2.5,
        # 3 seeds), k-NN 37.6 -> 59.1%. Local crops of a 32 px image are 16 px (2x2 patches), often background only:
        # with 6 of them, 47.3% k-NN (seed 0). Without an lr warm-up the teacher drifts to uniform (27.8%).
    torchrun --nproc_per_node=8 dino.py --data /imagenet --attention-maps 10                # vanilla recipe
    torchrun --nproc_per_node=8 dino.py --data /imagenet --batch-size 1024 --epochs 300 --teacher-temp 0.07 \
        --warmup-teacher-temp-epochs 30 --no-norm-last-layer                                # boosted recipe

The defaults are the official main_dino.py defaults, its README's "vanilla" run: ViT-S/16, 100 epochs,
batch 512 (8 GPUs x 64), 2 + 8 crops, τ_t 0.04, last layer normalised -> 69.3% k-NN, 74.0% linear top-1
on ImageNet. Its "boosted" run (the second command, 16 GPUs x 64) -> 73.3% / 76.0%.
"""
import argparse
import itertools
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common


# ----------------------------------------------------------------------------- config
def get_args_parser():
    p = argparse.ArgumentParser("dino.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = common.data_args(p)  # --data, --image-size, --workers, the domain switches, ...
    g.add_argument("--local-crops", type=common.non_negative_int, default=8, help="local crops per image, at 96/224 of "
                   "the global size (official: 2x224 + 8x96; the paper's best uses 10; 0 disables multi-crop, then use "
                   "--global-crops-scale 0.14 1)")
    g.add_argument("--global-crops-scale", type=float, nargs=2, default=(0.4, 1.0), help="global crops' area range")
    g.add_argument("--local-crops-scale", type=float, nargs=2, default=(0.05, 0.4), help="local crops' area range")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_small", choices=common.ARCHS, help="encoder of student and teacher")
    g.add_argument("--patch-size", type=common.positive_int, default=16,
                   help="ViT patch size (8 gives sharper attention maps, 4x the cost)")
    g.add_argument("--init", default="", help="continued pre-training: the encoder starts from a torchvision ResNet or "
                   "timm-named ViT state_dict (official DINO, MAE, MoCo v3 files too) or a checkpoint of this project; "
                   "student and teacher start from it, the heads fresh")
    g.add_argument("--freeze-encoder-epochs", type=common.non_negative_int, default=0, metavar="N",
                   help="with --init: the encoder stays as loaded for N epochs while the fresh DINO head learns, "
                   "then all train: a random head's first large gradients would otherwise wreck the loaded "
                   "features (0: off, the paper's recipe)")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the student ViT (not the teacher)")
    g.add_argument("--head-hidden", type=common.positive_int, default=2048, help="hidden width of the 3-layer head MLP")
    g.add_argument("--head-bottleneck", type=common.positive_int, default=256,
                   help="L2-normalised bottleneck before the last layer")
    g.add_argument("--out-dim", type=common.positive_int, default=65536,
                   help="K, the softmax width; large values (65k) work well on ImageNet")
    g.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="weight-normalise the head's last layer with its norm fixed at 1; the official runs turn it "
                        "off (a trained norm) for ViT-S, which performs better but can be unstable, and keep it for "
                        "ViT-B")
    g = p.add_argument_group("objective")
    g.add_argument("--student-temp", type=common.positive_float, default=0.1, help="τ_s")
    g.add_argument("--warmup-teacher-temp", type=common.positive_float, default=0.04,
                   help="τ_t at epoch 0; lower it if the loss does not decrease")
    g.add_argument("--teacher-temp", type=common.positive_float, default=0.04, help="τ_t after the warm-up; above "
                   "0.07 is unstable (the boosted run: 0.07, warmed up over 30 epochs)")
    g.add_argument("--warmup-teacher-temp-epochs", type=common.non_negative_int, default=0, help="linear τ_t warm-up")
    g.add_argument("--center-momentum", type=float, default=0.9, help="m in c <- m c + (1 - m) mean(teacher output)")
    g.add_argument("--momentum-teacher", type=float, default=0.996,
                   help="teacher EMA at step 0, cosine to 1 (0.9995 at batch 256)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=common.positive_int, default=100, help="training epochs (300-800 for the paper's "
                   "best). On a ResNet the official README uses SGD: --arch resnet50 --optimizer sgd --base-lr 0.03 "
                   "--weight-decay 1e-4 --weight-decay-end 1e-4 --global-crops-scale 0.14 1 "
                   "--local-crops-scale 0.05 0.14")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                   help="AdamW for ViTs; SGD (momentum 0.9) for ResNets")
    g.add_argument("--warmup-epochs", type=common.non_negative_int, default=10, help="linear lr warm-up")
    g.add_argument("--batch-size", type=common.positive_int, default=512,
                   help="global batch (images, not crops), split over the GPUs")
    g.add_argument("--base-lr", type=float, default=5e-4, help="lr = base-lr × batch-size / 256 after the warm-up")
    g.add_argument("--min-lr", type=float, default=1e-6, help="lr at the end of the cosine")
    g.add_argument("--weight-decay", type=float, default=0.04, help="weight decay at step 0 (not on biases and norms)")
    g.add_argument("--weight-decay-end", type=float, default=0.4, help="weight decay at the end, cosine schedule")
    g.add_argument("--clip-grad", type=float, default=3.0, help="max gradient norm of EACH parameter tensor (0: off)")
    g.add_argument("--freeze-last-layer", type=common.non_negative_int, default=1,
                   help="epochs with the head's last layer frozen (raise if the loss stalls)")
    g = common.run_args(p, "dino")  # --output-dir, --resume, --knn-every (of the teacher), --seed, --compile, ...
    g.add_argument("--attention-maps", type=common.non_negative_int, default=0, help="every N epochs and at the end, "
                   "save the teacher's last-layer CLS attention per head for 4 val images as one grid, OUTPUT_DIR/"
                   "attention/epochN.png: a row per image, the image then each head's map overlaid (ViT only; 0: off)")
    return p


# ----------------------------------------------------------------------------- model
class DINOHead(nn.Module):
    """3-layer MLP (GELU, no BN: the official ViT default), L2-normalised bottleneck, then a weight-
    normalised linear layer to K: row k of the weight is g_k·v_k/‖v_k‖ (official vision_transformer.py
    DINOHead, torch's weight_norm). With norm_last_layer the gains g stay at 1 and every logit is a
    cosine; without it g trains, is weight-decayed as a (K, 1) tensor and is averaged into the teacher."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # v keeps torch's default init, as official; parameters: original0 = g (K, 1), original1 = v (K, bottleneck)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        gain.data.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)                                     # (N, bottleneck) on the sphere
        # fp32 even under bf16 autocast: bf16 rounds cosines near 1 to steps of 2⁻⁸, about 0.1 logit
        # at τ_t = 0.04, and the softmaxes and the centre are computed from these logits.
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(x.float())                                   # (N, K)


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crops: one backbone pass per resolution (the global crops
    together, then the local crops together), one head pass over all. Output rows follow the
    list: crop 0's B images, crop 1's, ..."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        same_size = itertools.groupby(crops, key=lambda c: c.shape[-2:])
        features = [self.backbone(torch.cat(list(group))) for _, group in same_size]
        return self.head(torch.cat(features))                                    # (V·B, K)


class DINO(nn.Module):
    """Student and teacher of one architecture, and the centre c: all the state resume needs."""

    def __init__(self, student, teacher, out_dim):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.teacher.load_state_dict(self.student.state_dict())  # both start from the same weights
        self.teacher.requires_grad_(False)  # the teacher only moves by momentum_update
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, crops):
        """crops: the 2 global crops first, then the local ones, each (B, 3, H, W)."""
        with torch.no_grad():  # stop-gradient on the teacher (§3.1)
            teacher = self.teacher(crops[:2])                                    # (2·B, K) global crops only
        return self.student(crops), teacher                                      # (V·B, K), (2·B, K)


# ----------------------------------------------------------------------------- objective
def dino_loss(student_out, teacher_out, center, teacher_temp, student_temp=0.1):
    """Mean over the (teacher global crop i, student crop v ≠ i) pairs of H(P_t, P_s), each the mean
    over the images. student_out (V·B, K) and teacher_out (2·B, K) are stacked crop by crop."""
    # Centre then sharpen the teacher: subtracting c stops one dimension dominating, τ_t < τ_s
    # (0.04-0.07 vs 0.1) stops the uniform solution that centering alone would drift to (§3.1).
    teacher = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach().chunk(2)  # 2 x (B, K)
    student = F.log_softmax(student_out.float() / student_temp, dim=-1)
    student = student.chunk(len(student_out) // len(teacher[0]))                                       # V x (B, K)
    terms = [-(p_t * log_p_s).sum(-1).mean() for i, p_t in enumerate(teacher)
             for v, log_p_s in enumerate(student) if v != i]  # a crop is never its own target
    return sum(terms) / len(terms)


@torch.no_grad()
def update_center(center, teacher_out, momentum=0.9):
    """c <- m c + (1 - m) × the teacher's mean output over the GLOBAL batch (all ranks)."""
    batch_sum = teacher_out.float().sum(0, keepdim=True)                        # (1, K)
    count = len(teacher_out)
    if dist.is_available() and dist.is_initialized():
        # The centre is a statistic of the whole batch, and every rank must hold the same c: sum over ranks.
        dist.all_reduce(batch_sum)
        count *= dist.get_world_size()
    center.mul_(momentum).add_(batch_sum / count, alpha=1 - momentum)


def teacher_temperature(epoch, args):
    """τ_t: linear from --warmup-teacher-temp at epoch 0 to --teacher-temp at the last warm-up epoch,
    then constant; a high τ_t early makes training unstable (official schedule, per epoch)."""
    if epoch >= args.warmup_teacher_temp_epochs:
        return args.teacher_temp
    progress = epoch / max(1, args.warmup_teacher_temp_epochs - 1)
    return args.warmup_teacher_temp + (args.teacher_temp - args.warmup_teacher_temp) * progress


def schedules(step, total_steps, steps_per_epoch, lr, args):
    """Every per-step value of the recipe: lr warm-up + cosine, weight decay 0.04 -> 0.4 and the
    teacher momentum 0.996 -> 1 on cosines (a slower, sharper teacher late in training)."""
    warmup = args.warmup_epochs * steps_per_epoch
    # Warm-up as the official utils.cosine_scheduler, np.linspace(0, lr, warmup): the peak comes at the
    # last warm-up step (then the cosine starts from it again).
    cosine = common.cosine_schedule(step, total_steps, lr, args.min_lr, warmup)
    return dict(lr=lr * step / max(1, warmup - 1) if step < warmup else cosine,
                weight_decay=common.cosine_schedule(step, total_steps, args.weight_decay, args.weight_decay_end),
                momentum=common.cosine_schedule(step, total_steps, args.momentum_teacher, 1.0))


@torch.no_grad()
def momentum_update(model, momentum):
    """teacher <- m teacher + (1 - m) student, parameter by parameter (BN buffers stay the teacher's own)."""
    torch._foreach_lerp_(list(model.teacher.parameters()), list(model.student.parameters()), 1 - momentum)


@torch.no_grad()
def clip_gradients(parameters, max_norm):
    """The official clipping: each parameter tensor's gradient separately to norm <= max_norm
    (not torch's clip_grad_norm_ over all of them together)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    scales = (max_norm / (torch.stack(torch._foreach_norm(grads)) + 1e-6)).clamp(max=1.0)  # (tensors,): 3 kernels
    torch._foreach_mul_(grads, list(scales.unbind()))


# ----------------------------------------------------------------------------- training step
def training_step(model, crops, args, epoch=0):
    """Returns (loss, teacher output for the collapse signal, teacher entropy); updates the centre."""
    raw_model = getattr(model, "module", model)  # DDP or not
    student_out, teacher_out = model(crops)
    teacher_temp = teacher_temperature(epoch, args)
    loss = dino_loss(student_out, teacher_out, raw_model.center, teacher_temp, args.student_temp)
    with torch.no_grad():
        # Collapse monitor (§5.3): the teacher's entropy falls to 0 when one dimension dominates
        # and rises to log K when it goes uniform.
        p_t = F.softmax((teacher_out.float() - raw_model.center) / teacher_temp, dim=-1)
        entropy = torch.special.entr(p_t).sum(-1).mean()
        update_center(raw_model.center, teacher_out, args.center_momentum)  # after the loss used the old c
    # Each rank's loss is the mean over its own images; DDP's average of the gradients makes the
    # step the global batch's (the centre, the one cross-image term, is all-reduced above).
    return loss, teacher_out, entropy


# ----------------------------------------------------------------------------- loop
def augmentations(args):
    """Multi-crop: 2 global crops (blur 1.0 / 0.1 + solarize 0.2, as BYOL) and N local crops at 96/224
    of the size (at least 8 px), rounded to a multiple of the ViT patch size so that they tokenise exactly."""
    size, patch_size = args.image_size, args.patch_size if args.arch.startswith("vit") else 1
    local_size = patch_size * max(1, round(max(8, size * 96 / 224) / patch_size))
    global_scale, local_scale = tuple(args.global_crops_scale), tuple(args.local_crops_scale)
    global1 = common.View(size, global_scale, blur=1.0, interpolation="bicubic")  # bicubic, as the official code
    global2 = common.View(size, global_scale, blur=0.1, solarize=0.2, interpolation="bicubic")
    local = common.View(local_size, local_scale, blur=0.5, interpolation="bicubic")
    return common.domain_views(common.MultiView([global1, global2] + [local] * args.local_crops), args)  # --no-flip


def build_model(args):
    def network(drop_path):
        backbone = common.build_encoder(args.arch, args.image_size, args.patch_size, drop_path)
        common.load_encoder_weights(backbone, args)  # --init: student and teacher both start from it
        head = DINOHead(backbone.embed_dim, args.out_dim, args.head_hidden, args.head_bottleneck, args.norm_last_layer)
        return MultiCropNetwork(backbone, head)
    return DINO(network(args.drop_path), network(0.0), args.out_dim)


@torch.no_grad()
def cls_attention(backbone, images):
    """(B, heads, L): the last block's attention from the CLS token to each patch, recomputed from that block's input
    (the fused attention kernel of the forward pass never forms the softmax)."""
    last, inputs = backbone.blocks[-1], []
    hook = last.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    backbone(images)
    hook.remove()
    x = last.norm1(inputs[0])                                                   # (B, P + L, D)
    B, N, D = x.shape
    q, k, _ = last.attn.qkv(x).reshape(B, N, 3, last.attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, D/h)
    attention = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, h, N, N)
    return attention[:, :, 0, backbone.num_prefix_tokens:]  # the CLS row, to the patches (not CLS nor registers)


@torch.no_grad()
def save_attention_maps(backbone, images, path, mean, std):
    """One PNG grid: a row per image, the image then each head's CLS attention, upsampled (nearest) and overlaid in
    red on the image."""
    backbone.eval()
    attention = cls_attention(backbone, images)                                 # (B, heads, L)
    grid = images.shape[-1] // backbone.patch_size
    maps = attention.reshape(*attention.shape[:2], grid, grid)                  # (B, heads, g, g)
    maps = F.interpolate(maps, scale_factor=backbone.patch_size, mode="nearest")  # (B, heads, H, W)
    low, high = maps.amin((2, 3), keepdim=True), maps.amax((2, 3), keepdim=True)
    maps = (maps - low) / (high - low).clamp(min=1e-12)  # min-max per map, as plt.imsave in the official code
    mean, std = (torch.tensor(v, device=images.device)[:, None, None] for v in (mean, std))
    images = (images * std + mean).clamp(0, 1)                                  # (B, 3, H, W)
    red = torch.tensor([1.0, 0.0, 0.0], device=images.device)[:, None, None]
    overlays = 0.5 * images[:, None] + 0.5 * maps[:, :, None] * red             # (B, heads, 3, H, W)
    tiles = torch.cat([images[:, None], overlays], dim=1)                       # (B, 1 + heads, 3, H, W)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.utils.save_image(tiles.flatten(0, 1), path, nrow=tiles.shape[1], padding=1)


def main(args):
    run = common.Run(args, "dino")  # torchrun's ranks, start checks, OUTPUT_DIR
    is_vit = args.arch.startswith("vit")
    if args.attention_maps and not is_vit:
        raise common.UserError(f"--attention-maps needs a ViT (--arch vit_*), not {args.arch}")
    loader = run.loader(augmentations(args))
    torch.manual_seed(args.seed)
    model = build_model(args).to(run.device)
    lr = args.base_lr * args.batch_size / 256  # linear scaling rule
    groups = common.param_groups(model.student, args.weight_decay)  # [decayed, not decayed]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, fused=run.device.type == "cuda")
    if args.attention_maps and run.is_main:  # a few fixed images (val if there is one)
        transform = common.eval_transform(args.image_size, args.mean, args.std, args.grayscale_input)
        split = "val" if common.has_split(args.data) else "train"
        shown = common.build_dataset(args.data, split, transform, args.data_root, args.skip_bad_images)
        shown = torch.stack([shown[i][0] for i in range(min(4, len(shown)))]).to(run.device)
    # The teacher's backbone is what the paper evaluates: the k-NN monitor reads it and the checkpoint exports it.
    # ResNets: global-batch BN (SyncBN), as the official code; ViTs have none.
    ddp_model = run.prepare(model, optimizer, encoder=model.teacher.backbone, sync_bn=not is_vit)

    total_steps = args.epochs * len(loader)
    for epoch in run.epochs():
        for crops in run.batches(loader):
            values = schedules(run.step, total_steps, len(loader), lr, args)
            for group in optimizer.param_groups:
                group["lr"] = values["lr"]
            optimizer.param_groups[0]["weight_decay"] = values["weight_decay"]  # the decayed group only
            with torch.autocast(run.device.type, torch.bfloat16, enabled=run.device.type == "cuda"):
                loss, teacher_out, entropy = training_step(ddp_model, crops, args, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                clip_gradients(model.student.parameters(), args.clip_grad)
            if epoch < args.freeze_last_layer:  # no gradient: the optimizer leaves it alone (no decay either)
                for p in model.student.head.last_layer.parameters():
                    p.grad = None
            if epoch < args.freeze_encoder_epochs:  # no gradient: the optimizer leaves the --init weights alone
                model.student.backbone.zero_grad(set_to_none=True)  # while the fresh head settles (no decay either)
            optimizer.step()
            momentum_update(model, values["momentum"])
            run.step_done(loss, teacher_out, teacher_entropy=entropy)  # progress, divergence and SIGTERM stops
        run.epoch_done(teacher_temp=teacher_temperature(epoch, args), momentum=values["momentum"])  # k-NN, checkpoint
        if run.is_main and run.due(args.attention_maps):
            path = os.path.join(args.output_dir, "attention", f"epoch{epoch + 1:04d}.png")
            save_attention_maps(model.teacher.backbone, shown, path, args.mean, args.std)
    run.finish()


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except common.UserError as error:
        sys.exit(common.error_line("dino.py", error))  # exit code 1, printed once under torchrun
