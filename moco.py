r"""MoCo v3 (Chen, Xie & He, ICCV 2021, arXiv:2104.02057); --version v2: MoCo v2's queue (arXiv:2003.04297).

A query q of one view must pick out the key k⁺ of the other view among negative keys, made by a momentum
encoder θk ← m·θk + (1 − m)·θq that no gradient reaches (MoCo, He et al. 2020, arXiv:1911.05722):

    L(q) = −log  exp(q·k⁺ / τ)  /  Σ_k exp(q·k / τ),      q, k L2-normalised

v3: q = predictor(projector(encoder(x))); the negatives are the other keys of the global batch; the loss is
symmetrised; m rises from 0.99 to 1; a ViT's patch projection stays at its random init (§4.2: stability);
SyncBN. v2: no predictor; the negatives are a FIFO queue of the K = 65536 latest keys; m = 0.999; shuffled
BN (MoCo §3.3): with per-GPU BN a query and its key share a sub-batch's statistics that the queue's keys
lack, a shortcut to a low loss, so keys are computed on a batch shuffled across GPUs. SyncBN would not do:
query and key would still be normalised over the same images, only more of them. On one GPU the shuffle
stays inside one BN batch and changes nothing: query and key share its statistics, as with SyncBN.

    python moco.py --data shapes:32:5000:2000 --arch vit_nano --patch-size 8 --batch-size 64 --proj-hidden 512 \
        --proj-dim 128 --base-lr 4e-3 --epochs 6 --warmup-epochs 1 --knn-every 1 --workers 0
        # CPU, ~5 min on one core (benchmarks/learning.py's recipe): linear probe 50.0 -> 65.1% (+15.1 ± 3.2, 3 seeds);
        # the k-NN dips, then climbs back to the random init's (55.1 -> 55.0%). --version v2 there (--queue-size 512,
        # --optimizer adamw --weight-decay 0.1 --momentum 0.99, as v3; the paper's SGD is a ResNet's): linear
        # 50.2 -> 64.8% (+14.6 ± 3.1; k-NN 55.1 -> 51.5); with SGD (--base-lr 1) no gain (+1.1 ± 5.3), nor for
        # lightly's MoCo v2 at those settings (+2.0 ± 5.0)
    torchrun --nproc_per_node=8 moco.py --data /imagenet                   # v3 ViT-S/16 (12 heads), 300 ep -> 73.2%
    torchrun --nproc_per_node=8 moco.py --data /imagenet --arch resnet50   # v3 R-50, LARS, τ 1.0, 100 ep -> 68.9%
    torchrun --nproc_per_node=8 moco.py --data /imagenet --version v2      # v2 R-50, batch 256, 200 ep -> 67.5%
"""
import argparse
import copy
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------- config
RECIPES = {  # the papers' settings: official CONFIG.md (v3) and README (v2: --mlp --moco-t 0.2 --aug-plus --cos)
    "v3-vit": dict(optimizer="adamw", base_lr=1.5e-4, weight_decay=0.1, batch_size=4096, epochs=300, warmup_epochs=40,
                   temperature=0.2, momentum=0.99, proj_hidden=4096, proj_dim=256, queue_size=0, crop_min=0.08),
    "v3-resnet": dict(optimizer="lars", base_lr=0.6, weight_decay=1e-6, batch_size=4096, epochs=100, warmup_epochs=10,
                      temperature=1.0, momentum=0.99, proj_hidden=4096, proj_dim=256, queue_size=0, crop_min=0.2),
    "v2": dict(optimizer="sgd", base_lr=0.03, weight_decay=1e-4, batch_size=256, epochs=200, warmup_epochs=0,
               temperature=0.2, momentum=0.999, proj_hidden=2048, proj_dim=128, queue_size=65536, crop_min=0.2),
}


class RecipeParser(argparse.ArgumentParser):  # --version picks the method; unset flags take its RECIPES values
    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        vars(ns).setdefault("arch", "vit_small" if ns.version == "v3" else "resnet50")
        family = "v2" if ns.version == "v2" else "v3-vit" if ns.arch.startswith("vit") else "v3-resnet"
        vars(ns).update({**RECIPES[family], **vars(ns)})  # the flags given override the recipe
        return ns, rest


def get_args_parser():
    p = RecipeParser("moco.py", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def recipe_flag(group, name, text, **kw):  # default=SUPPRESS: unset, the attribute comes from RECIPES
        per_recipe = ", ".join(f"{family}: {recipe[name]}" for family, recipe in RECIPES.items())
        kw.setdefault("type", type(RECIPES["v2"][name]))
        group.add_argument("--" + name.replace("_", "-"), help=f"{text} ({per_recipe})", default=argparse.SUPPRESS,
                           **kw)
    g = common.data_args(p)  # --data, --image-size, --workers, the domain switches, ...
    recipe_flag(g, "crop_min", "smallest crop area of RandomResizedCrop")
    g = p.add_argument_group("method")
    g.add_argument("--version", default="v3", choices=["v3", "v2"], help="the method; it sets the recipe defaults")
    g.add_argument("--arch", default=argparse.SUPPRESS, choices=common.ARCHS,
                   help="encoder (v3: vit_small, v2: resnet50)")
    g.add_argument("--patch-size", type=common.positive_int, default=16, help="ViT patch size")
    g.add_argument("--init", default="", help="continued pre-training: the encoder starts from a torchvision ResNet or "
                   "timm-named ViT state_dict (official DINO, MAE, MoCo v3 files too) or a checkpoint of this project; "
                   "the momentum encoder starts equal to it, the heads fresh")
    g.add_argument("--freeze-encoder-epochs", type=common.non_negative_int, default=0, metavar="N",
                   help="with --init: the encoder stays as loaded for N epochs while the fresh heads learn, "
                   "then all train: a random head's first large gradients would otherwise wreck the loaded "
                   "features (0: off, the paper's recipe)")
    g.add_argument("--stop-grad-conv1", action=argparse.BooleanOptionalAction, default=True,
                   help="ViT: freeze the patch projection at its random init (v3 §4.2: stable training)")
    recipe_flag(g, "proj_hidden", "hidden width of the projector and predictor MLPs", type=common.positive_int)
    recipe_flag(g, "proj_dim", "output width of projector and predictor (the space of q, k)", type=common.positive_int)
    recipe_flag(g, "temperature", "τ of the softmax; v3: 0.2 best for ViT, 1.0 for ResNet", type=common.positive_float)
    recipe_flag(g, "momentum", "key encoder momentum m (v3: start of the cosine rise to 1; v2: fixed)")
    recipe_flag(g, "queue_size", "v2: number of queued negative keys K, a multiple of --batch-size (v3 has none)")
    g = p.add_argument_group("optimisation")
    recipe_flag(g, "epochs", "training epochs; v3 ResNet-50 (CONFIG.md): 100 -> 68.9%%, 300 with --base-lr 0.3 -> "
                "72.8%%, 1000 with --base-lr 0.3 --weight-decay 1.5e-6 --momentum 0.996 -> 74.6%%",
                type=common.positive_int)
    recipe_flag(g, "warmup_epochs", "linear lr warm-up, then cosine decay to 0", type=common.non_negative_int)
    recipe_flag(g, "batch_size", "global batch, split over the GPUs", type=common.positive_int)
    recipe_flag(g, "optimizer", "LARS (trust 0.001) and SGD use momentum 0.9", choices=["adamw", "lars", "sgd"])
    recipe_flag(g, "base_lr", "lr = base-lr × batch-size / 256")
    recipe_flag(g, "weight_decay", "weight decay (LARS: not on biases and BN parameters)")
    common.run_args(p, "moco")  # --output-dir, --resume, --knn-every, --seed, --compile, ...
    return p


# ----------------------------------------------------------------------------- model
class MoCo(nn.Module):
    """Query side: encoder → projector → predictor (v2: none). Key side: a momentum copy of encoder + projector."""

    def __init__(self, encoder, projector, predictor, queue_size, dim):
        super().__init__()
        self.encoder, self.projector, self.predictor = encoder, projector, predictor
        self.momentum_encoder = copy.deepcopy(nn.Sequential(encoder, projector)).requires_grad_(False)
        if queue_size:  # buffers, so checkpoints hold them; random unit keys until K / batch steps replace them
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # (K, D)
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # slot of the next key

    def forward(self, *views):  # one q (N, D) per view, each view its own BN batch (official code)
        return [self.predictor(self.projector(self.encoder(x))) for x in views]


@torch.no_grad()
def momentum_update(model, momentum):
    """θk ← m·θk + (1 − m)·θq for encoder and projector (the predictor has no key-side twin)."""
    online = [*model.encoder.parameters(), *model.projector.parameters()]  # the order of Sequential(encoder, projector)
    torch._foreach_lerp_(list(model.momentum_encoder.parameters()), online, 1 - momentum)  # θk += (1−m)(θq − θk)


# ----------------------------------------------------------------------------- objective
def contrastive_loss(q, k, temperature, queue=None):
    """InfoNCE of queries q (N, D) against keys k (N, D), unnormalised; q[i] and k[i] are views of image i.
    queue=None (v3): the negatives are every rank's keys. queue (K, D) of unit keys (v2): they are the queue."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    autocast_off = torch.autocast(q.device.type, enabled=False)  # fp32 logits: bf16 rounds 8-16 to steps of 1/16
    if queue is None:
        # Keys of all GPUs gathered WITHOUT gradient: targets. Each rank trains its own queries; DDP averages.
        k_all = common.all_gather(k, keep_grad=False)                          # (world·N, D)
        with autocast_off:
            logits = q @ k_all.T / temperature                                 # (N, world·N)
        rank = dist.get_rank() if dist.is_initialized() else 0
        labels = torch.arange(len(q), device=q.device) + rank * len(q)        # k⁺ of q[i] sits at rank·N + i
        # ×2τ (official code): the gradient of CE(logits / τ) scales as 1/τ; multiplying by τ undoes it
        # so the tuned lr does not depend on τ. The 2 is a constant scale (×1 at τ = 0.5).
        return F.cross_entropy(logits, labels) * 2 * temperature
    positive = (q * k).sum(dim=1, keepdim=True)                                # (N, 1)
    with autocast_off:
        negatives = q @ queue.T                                                # (N, K), fp32 as the positive
    logits = torch.cat([positive, negatives], dim=1) / temperature             # (N, 1 + K), k⁺ is class 0
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))  # no 2τ in v2


# ----------------------------------------------------------------------------- training step
@torch.no_grad()
def shuffled_keys(model, x):
    """v2's shuffled BN: each rank encodes a random N of the global batch. Keys of x (N, D) and of all (world·N, D)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    x_all = common.all_gather(x, keep_grad=False)                              # (world·N, C, H, W)
    order = torch.randperm(len(x_all), device=x.device)
    if world > 1:
        dist.broadcast(order, src=0)                                           # one permutation for every rank
    k = model.momentum_encoder(x_all[order.view(world, -1)[rank]])             # (N, D) keys of shuffled images
    k_all = common.all_gather(k, keep_grad=False)[order.argsort()]             # (world·N, D) unshuffled
    return k_all.view(world, len(x), -1)[rank], k_all


@torch.no_grad()
def enqueue(model, keys):
    """FIFO: the global batch of keys (B, D) overwrites the oldest B; the pointer wraps at K (no GPU sync)."""
    slots = (model.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(model.queue)  # (B,)
    model.queue[slots] = F.normalize(keys.float(), dim=1)
    model.queue_ptr.copy_((model.queue_ptr + len(keys)) % len(model.queue))


def training_step(model, views, args):
    raw = getattr(model, "module", model)  # DDP wraps the query forward; key side and queue are read directly
    if args.version == "v3":
        q1, q2 = model(*views)
        with torch.no_grad():  # the stop-gradient: keys are targets
            k1, k2 = [raw.momentum_encoder(x) for x in views]
        # Symmetrised: each view queries the other's key; negatives are the keys of the global batch.
        loss = contrastive_loss(q1, k2, args.temperature) + contrastive_loss(q2, k1, args.temperature)
        return loss, q1
    (q,) = model(views[0])
    k, k_all = shuffled_keys(raw, views[1])
    queue = raw.queue.clone()  # the negatives are the queue before this batch enters it (enqueue writes in place)
    enqueue(raw, k_all)  # every rank enqueues the same gathered keys: the queues stay identical
    return contrastive_loss(q, k, args.temperature, queue), q


# ----------------------------------------------------------------------------- loop
def augmentations(args):
    """v3: BYOL's asymmetric pair (blur always / rarely, solarize the second); v2: "aug-plus" for both views."""
    v3 = args.version == "v3"
    size, scale, jitter = args.image_size, (args.crop_min, 1.0), (0.4, 0.4, 0.2 if v3 else 0.4, 0.1)  # not strengthened
    views = common.MultiView([common.View(size, scale, jitter, blur=1.0 if v3 else 0.5),
                              common.View(size, scale, jitter, blur=0.1 if v3 else 0.5, solarize=0.2 if v3 else 0.0)])
    return common.domain_views(views, args)  # --no-flip, --no-color, ... (default: the paper's)


def encoder_config_of(args):
    """What probe.py needs to rebuild the encoder. MoCo v3's ViT-S has 12 heads (official vits.py), not
    DINO's / timm's 6: the weights have the same shapes either way, so the count must travel with them."""
    return dict(arch=args.arch, image_size=args.image_size, patch_size=args.patch_size,
                **({"num_heads": 12} if args.arch == "vit_small" and args.version == "v3" else {}))


def build_model(args):
    vit = args.arch.startswith("vit")
    encoder = common.build_encoder(**encoder_config_of(args), sincos=True,  # v3's fixed 2-D sin-cos
                                   zero_init_residual=args.version == "v3")  # v3 builder: blocks start as the identity
    if vit:  # official VisionTransformerMoCo init (vits.py)
        for name, m in encoder.named_modules():
            if isinstance(m, nn.Linear):  # Xavier-uniform; q, k and v as three separate (D, D) matrices
                bound = (6 / (m.weight.shape[0] // (3 if name.endswith("qkv") else 1) + m.weight.shape[1])) ** 0.5
                nn.init.uniform_(m.weight, -bound, bound)
        nn.init.normal_(encoder.cls_token, std=1e-6)
        # The official sin-cos embedding puts the row (y) half first, MAE's (and common's) the column (x) half.
        pos = encoder.pos_embed.data[0, 1:]                                    # (L, D), CLS position stays 0
        encoder.pos_embed.data[0, 1:] = torch.cat(pos.chunk(2, dim=1)[::-1], dim=1)
        # The patch projection stays at its random init, Xavier-uniform over (D, 3·p·p): §4.2, stable training.
        nn.init.xavier_uniform_(encoder.patch_embed.proj.weight.view(encoder.embed_dim, -1))
        nn.init.zeros_(encoder.patch_embed.proj.bias)
        encoder.patch_embed.requires_grad_(not args.stop_grad_conv1)
    common.load_encoder_weights(encoder, args)  # --init: before MoCo() copies the momentum encoder, so both start equal
    d, hidden, out = encoder.embed_dim, args.proj_hidden, args.proj_dim
    if args.version == "v2":  # Linear-ReLU-Linear, no BN (official --mlp); no predictor
        return MoCo(encoder, nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)),
                    nn.Identity(), args.queue_size, out)
    # Official heads (builder.py _build_mlp): no biases; BN after every layer (the last one without affine),
    # except at the ResNet predictor's output.
    projector = common.mlp([d] + [hidden] * (2 if vit else 1) + [out])
    return MoCo(encoder, projector, common.mlp([out, hidden, out], last_bn=vit), 0, out)


def main(args):
    run = common.Run(args, "moco")  # torchrun's ranks, start checks, OUTPUT_DIR
    v3 = args.version == "v3"
    if (args.queue_size != 0) == v3 or args.queue_size < 0 or args.queue_size % args.batch_size:
        raise common.UserError(f"--queue-size {args.queue_size}: MoCo v2 needs a positive multiple of the global "
                               f"--batch-size {args.batch_size}; MoCo v3 has no queue (0)")
    loader = run.loader(augmentations(args))
    torch.manual_seed(args.seed)
    model = build_model(args).to(run.device)
    lr = args.base_lr * args.batch_size / 256  # linear scaling rule
    trainable = [p for p in model.parameters() if p.requires_grad]  # not the key side, nor a frozen patch projection
    if args.optimizer == "lars":  # biases and BN: no decay, no trust ratio (official v3 LARS)
        optimizer = common.LARS(common.param_groups(model, args.weight_decay), lr=lr, momentum=0.9)
    elif args.optimizer == "adamw":  # the official code decays every parameter, biases and norms included
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=args.weight_decay, fused=run.device.type == "cuda")
    else:
        optimizer = torch.optim.SGD(trainable, lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    # v3: SyncBN, global-batch statistics. v2: per-GPU BN with keys shuffled across GPUs (see shuffled_keys).
    ddp_model = run.prepare(model, optimizer, encoder=model.encoder, sync_bn=v3, encoder_config=encoder_config_of(args))

    total_steps, warmup_steps = args.epochs * len(loader), args.warmup_epochs * len(loader)
    for epoch in run.epochs():
        for views in run.batches(loader):
            # v3 moves the lr every step (official main_moco.py: epoch + i / iters_per_epoch); v2's cosine moves once
            # per epoch (moco's main_moco.py adjust_learning_rate with --cos); a warm-up, if any, ramps per step.
            at = run.step if v3 or run.step < warmup_steps else epoch * len(loader)
            for group in optimizer.param_groups:
                group["lr"] = common.cosine_schedule(at, total_steps, lr, 0.0, warmup_steps)
            with torch.autocast(run.device.type, torch.bfloat16, enabled=run.device.type == "cuda"):
                loss, z = training_step(ddp_model, views, args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if epoch < args.freeze_encoder_epochs:  # no gradient: the optimizer leaves the --init weights alone
                model.encoder.zero_grad(set_to_none=True)  # while the fresh heads settle (no decay, no momentum)
            optimizer.step()
            # v3: m rises from 0.99 to 1 on a half cosine (as BYOL's), at the step count after this step: the keys
            # settle as training ends. v2: fixed.
            momentum = common.cosine_schedule(run.step + 1, total_steps, args.momentum, 1.0) if v3 else args.momentum
            momentum_update(model, momentum)
            run.step_done(loss, z)  # progress, divergence and SIGTERM stops
        run.epoch_done(momentum=momentum)  # k-NN, checkpoint, log
    run.finish()


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except common.UserError as error:
        sys.exit(common.error_line("moco.py", error))  # exit code 1, printed once under torchrun
