"""Reading an encoder from a file: one loader for every entry point (--init in the methods, probe.py, embed.py).
This project's checkpoints; torchvision, timm and official DINO / MAE / MoCo v3 files, wrapped or not; DINOv2 (hub,
timm: LayerScale, registers, position embeddings without a CLS slot) and Hugging Face state dicts. A mismatch, a
malformed file or a NaN is one line. Then what probe.py and embed.py share: the flags, the features they read, the
heads probe.py trains and saves, embed.py applies."""
import math
import os

import torch
import torch.nn as nn
from tqdm import tqdm

import common


# ----------------------------------------------------------------------------- a file's encoder, whatever wrote it
WRAPPERS = ("teacher", "student", "state_dict", "model")
PREFIXES = ("module.", "backbone.", "base_encoder.", "encoder.")


def public_names(state, name):
    """Other codebases' names -> ours: timm's reg_token is DINOv2's register_tokens. ViT-g's SwiGLU MLP is refused."""
    if swiglu := next((k for k in state if ".mlp.w12." in k or ".mlp.weights_in." in k), None):  # DINOv2's, HF's
        raise common.UserError(f"{name}: {swiglu} is ViT-g's SwiGLU MLP, which this ViT does not have (its MLP is "
                               "fc1-GELU-fc2): use a ViT-S, B or L file")
    return {"register_tokens" if k == "reg_token" else k: v for k, v in state.items()}


HF_NAMES = (  # Hugging Face's Dinov2Model / ViTMAEModel -> timm's, in this order (attention.output before output)
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."), ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.", ""), ("encoder.layer.", "blocks."), ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
    ("attention.output.dense.", "attn.proj."), ("attention.attention.", "attn."), ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."), ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
    ("layernorm.", "norm."))
HF_MARK = "embeddings.patch_embeddings.projection.weight"


def hugging_face_names(state):
    """A Hugging Face state_dict in timm's names: prefix (dinov2., vit.) and heads (classifier, MAE's decoder)
    dropped, keys renamed, the separate query, key, value projections stacked into one qkv, as timm's."""
    prefix = next(k for k in state if k.endswith(HF_MARK))[:-len(HF_MARK)]
    renamed = {}
    for key, value in state.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
            for old, new in HF_NAMES:
                key = key.replace(old, new)
            renamed[key] = value
    for query in [k for k in renamed if ".attn.query." in k]:
        parts = [query.replace("query", part) for part in ("query", "key", "value")]
        if all(part in renamed for part in parts):  # else one of them is "unexpected": one line from load_weights
            renamed[query.replace("query", "qkv")] = torch.cat([renamed.pop(part) for part in parts])  # (3D, ...)
    return renamed


def encoder_state(saved, name):
    """The encoder's state_dict in a loaded file, in timm's names: a checkpoint's encoder, or a torchvision / timm /
    Hugging Face state_dict as official files wrap it: DINO's {'teacher': {'backbone.*'}} (a full checkpoint's
    teacher), MoCo v3's {'state_dict': {'module.base_encoder.*'}}, MAE's and DINOv2's {'model': ...}."""
    state = saved["encoder"] if isinstance(saved, dict) and "encoder_config" in saved else saved
    while isinstance(state, dict) and (wrapper := next((k for k in WRAPPERS if isinstance(state.get(k), dict)), None)):
        state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise common.UserError(f"{name}: holds no state_dict of tensors")
    if any(k.endswith(HF_MARK) for k in state):
        state = hugging_face_names(state)
    for prefix in PREFIXES:  # DDP's module.*, then the method's wrapper around the encoder
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return public_names(state, name)


LAYOUT = dict(layer_scale=False, registers=0, cls_slot=True)  # build_encoder's defaults: this project's own ViT


def vit_layout(state, name):
    """The ViT options a state_dict's keys and shapes show (a file's or an encoder's): LayerScale (ls1.gamma: DINOv2,
    DeiT III), registers (register_tokens (1, R, D): DINOv2-reg, timm's *_reg4_dinov2) and a CLS slot in pos_embed,
    which timm's no_embed_class files lack (DeiT III, *_reg4_dinov2): a length g² is a square, 1 + g² never is."""
    pos, registers = state["pos_embed"], state.get("register_tokens")
    n = pos.shape[1] if pos.ndim == 3 else 0
    cls_slot = math.isqrt(n) ** 2 != n
    if n < 2 or math.isqrt(n - cls_slot) ** 2 != n - cls_slot:
        raise common.UserError(f"{name}: pos_embed is {list(pos.shape)}, not (1, [1 +] g*g, D) for a g x g grid of "
                               "patches")
    return dict(layer_scale="blocks.0.ls1.gamma" in state, cls_slot=cls_slot,
                registers=registers.shape[1] if registers is not None and registers.ndim == 3 else 0)


def adopt_layout(encoder, state, name):
    """Give a built ViT the layout of the file it loads (as build_encoder(**layout)): --init and probe.py need no flag
    for it. Before any optimizer or EMA copy holds the parameters: methods call it right after build_encoder."""
    if not isinstance(encoder, common.VisionTransformer) or "pos_embed" not in state:
        return
    layout, dim = vit_layout(state, name), encoder.embed_dim
    if layout == vit_layout(encoder.state_dict(), name):
        return
    encoder.layout = {k: v for k, v in layout.items() if v != LAYOUT[k]}  # its checkpoint's encoder_config keeps it
    for block in encoder.blocks:
        block.ls1, block.ls2 = (common.LayerScale(dim) if layout["layer_scale"] else nn.Identity() for _ in range(2))
    encoder.register_tokens = nn.Parameter(torch.zeros(1, layout["registers"], dim)) if layout["registers"] else None
    encoder.num_prefix_tokens = 1 + layout["registers"]
    if layout["cls_slot"] != encoder.cls_slot:
        length = encoder.pos_embed.shape[1] - encoder.cls_slot + layout["cls_slot"]
        encoder.pos_embed = nn.Parameter(torch.zeros(1, length, dim), requires_grad=encoder.pos_embed.requires_grad)
        encoder.cls_slot = int(layout["cls_slot"])
    encoder.to(encoder.cls_token.device)  # the new parameters join the others


def load_weights(encoder, state, name, arch):
    """Load state (encoder_state's names) strictly, less classifier heads, MAE's decoder and DINOv2's mask token,
    with the file's ViT layout and position embeddings resized; any other mismatch or a non-finite weight is one line.
    An MAE fine-tuned file (global pool) has fc_norm, the LayerNorm its features were trained through, as final norm."""
    if "fc_norm.weight" in state and "norm.weight" not in state:  # MAE's models_vit.py with global_pool
        state = {"norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.", "fc_norm.", "decoder", "mask_token"))}
    adopt_layout(encoder, state, name)
    expected = encoder.state_dict()
    pos, pos_here = state.get("pos_embed"), expected.get("pos_embed")
    if pos is not None and pos_here is not None and pos.shape[1] != pos_here.shape[1]:  # trained at another size
        slot = encoder.cls_slot  # the file's, after adopt_layout
        grid = math.isqrt(pos_here.shape[1] - slot)
        # Each family's own resize: DINOv2 with registers and timm's no_embed_class files (the layouts with registers
        # or no CLS slot) antialias to size=(g, g); DINO and DINOv2 without registers scale by (g + 0.1)/n.
        antialias = encoder.num_prefix_tokens > 1 or not slot
        resized = common.resize_pos_embed(pos[:, slot:], grid, grid, antialias)
        state["pos_embed"] = torch.cat([pos[:, :slot], resized], 1)
    problems = ([f"{k} is {list(state[k].shape)} in the file, {list(v.shape)} here" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape] + [f"{k} is missing" for k in expected if k not in state]
                + [f"{k} is unexpected" for k in state if k not in expected])
    if problems:
        raise common.UserError(f"{name} does not fit a {arch}: {problems[0]} ({len(problems)} keys differ); check "
                               "--arch, --patch-size and, for a 224-px ResNet, an --image-size above 64 (the 7x7 stem)")
    if not common.all_finite(state):  # a diverged run's weights would give normal-looking, meaningless numbers
        raise common.UserError(f"{name}: non-finite (NaN or inf) weights; the run that wrote them diverged")
    encoder.load_state_dict(state)


def load_init(encoder, args):
    """--init PATH: the encoder starts from PATH, unless the run resumes: then the checkpoint's weights replace these,
    and its encoder gives the layout (LayerScale, registers) that PATH gave the run; PATH is not read again."""
    path = os.path.join(args.output_dir, "checkpoint.pth")
    if resume := args.resume or (path if os.path.exists(path) else ""):
        adopt_layout(encoder, common.load_checkpoint(resume)["encoder"], resume)
    else:
        load_weights(encoder, encoder_state(common.read_torch_file(args.init, "--init"), f"--init {args.init}"),
                     f"--init {args.init}", args.arch)


# ----------------------------------------------------------------------------- probe.py's and embed.py's flags
def encoder_args(p):
    """How to read an encoder from a file, and which of its features: probe.py's flags, and embed.py's."""
    add, i, f = p.add_argument_group("encoder").add_argument, common.positive_int, float
    add("checkpoint", help="a checkpoint of this project's methods, or a plain state_dict with --arch")
    add("--arch", default=None, choices=common.ARCHS, help="only for a plain torchvision/timm-named state_dict")
    add("--patch-size", type=i, default=None, help="ViT patch size, with --arch (default: the file's)")
    add("--num-heads", type=i, default=None, help="ViT heads, with --arch, if not the usual (MoCo v3 ViT-S: 12)")
    add("--image-size", type=i, default=None, help="default: the checkpoint's training size")
    add("--mean", type=f, nargs=3, default=None, help="default: the run's --mean (ImageNet's for a state_dict)")
    add("--std", type=f, nargs=3, default=None, help="default: the run's --std (ImageNet's for a state_dict)")
    add("--grayscale-input", action="store_true", help="one channel repeated 3 times (default: as the run did)")
    add("--n-last-blocks", type=i, default=1, help="ViT: the normalised CLS of the last N blocks (DINO: 4 for ViT-S)")
    add("--avgpool-patchtokens", action="store_true", help="ViT: and the mean patch token (DINO: ViT-B, with N = 1)")
    add("--batch-size", type=i, default=256, help="feature extraction batch per rank")
    add("--workers", type=common.non_negative_int, default=min(8, os.cpu_count()), help="loader processes per rank")


# ----------------------------------------------------------------------------- what probe.py and embed.py read
def load_encoder(args, drop_path=0.0, random_init=False):
    """(encoder, image_size) from a project checkpoint, or from a plain state_dict and --arch; random_init: the same
    architecture, not loaded (the baselines)."""
    saved = {}  # the run's flags: a plain state_dict has none
    if args.arch is None:
        checkpoint = common.read_torch_file(args.checkpoint)
        if not isinstance(checkpoint, dict) or "encoder_config" not in checkpoint:
            raise common.UserError(f"{args.checkpoint} was not written by this project's training scripts: a plain "
                                   "state_dict needs its architecture (--arch; in --compare, FILE:ARCH)")
        config, state = dict(checkpoint["encoder_config"]), checkpoint["encoder"]
        saved = checkpoint.get("args", {})  # the run's pixels (--mean, --std, --grayscale-input): probe as it trained
        args.mean, args.std = args.mean or saved.get("mean"), args.std or saved.get("std")
        args.grayscale_input = args.grayscale_input or saved.get("grayscale_input", False)
    else:  # a torchvision / timm-named state_dict, or an official file, unwrapped as --init unwraps it
        state = encoder_state(common.read_torch_file(args.checkpoint), args.checkpoint)
        patch = state.get("patch_embed.proj.weight")  # (D, 3, p, p)
        config = dict(arch=args.arch, image_size=args.image_size or common.default_image_size(args.data),
                      patch_size=args.patch_size or (patch.shape[-1] if patch is not None else 16),
                      num_heads=args.num_heads)  # the layout: from the file's keys
    args.mean, args.std = args.mean or common.IMAGENET_MEAN, args.std or common.IMAGENET_STD  # older runs, state_dicts
    # The run's views too: what it kept out (a mirror image, a colour change: the signal) stays out of the probe's
    # training views (--augment, fine-tuning); the command line overrides.
    run_views = dict(flip=not saved.get("no_flip"), color=not saved.get("no_color"), vflip=saved.get("vflip", False),
                     rot90=saved.get("rot90", False))
    vars(args).update({name: value for name, value in run_views.items() if getattr(args, name, None) is None})
    image_size = args.image_size or config["image_size"]
    if config["arch"].startswith("resnet") and hasattr(state.get("conv1.weight"), "shape"):
        # The stem follows the weights, not the data: a 224-px ResNet (7x7/2 conv + max-pool) probed on 32 px CIFAR
        # keeps its stem, and a CIFAR one (3x3/1) keeps its own at any size.
        config["image_size"] = 224 if state["conv1.weight"].shape[-1] == 7 else 32
    if config["arch"].startswith("vit"):
        config["drop_path"] = drop_path
    encoder = common.build_encoder(**config)
    if random_init:  # the file's architecture (LayerScale, registers), not its weights
        adopt_layout(encoder, state, args.checkpoint)
    else:
        load_weights(encoder, state, args.checkpoint, config["arch"])  # a mismatch or a NaN: one line
    encoder.config = {k: v for k, v in config.items() if k != "drop_path"} | getattr(encoder, "layout", {})
    return encoder, image_size


def check_readout(encoder, args):
    if not isinstance(encoder, common.VisionTransformer) and (args.n_last_blocks > 1 or args.avgpool_patchtokens):
        raise common.UserError("--n-last-blocks and --avgpool-patchtokens are ViT readouts (DINO)")
    if isinstance(encoder, common.VisionTransformer) and args.n_last_blocks > len(encoder.blocks):
        raise common.UserError(f"--n-last-blocks {args.n_last_blocks}: the ViT has {len(encoder.blocks)} blocks")


class Readout(nn.Module):
    """The features a linear probe sees. ResNets: the pooled features. ViTs: the CLS token through the final norm;
    DINO's eval_linear.py concatenates it over the last n blocks (each through the final norm) and, with avgpool,
    the mean of the last block's normalised patch tokens."""

    def __init__(self, encoder, n_last_blocks=1, avgpool=False):
        super().__init__()
        self.encoder, self.n, self.avgpool = encoder, n_last_blocks, avgpool
        self.dim = encoder.embed_dim * (n_last_blocks + avgpool)

    def forward(self, images):
        if self.n == 1 and not self.avgpool:
            return self.encoder(images)
        outputs = []  # the tokens of the last n blocks
        hooks = [block.register_forward_hook(lambda module, inputs, out: outputs.append(out))
                 for block in self.encoder.blocks[-self.n:]]
        self.encoder(images)
        for hook in hooks:
            hook.remove()
        tokens = [self.encoder.norm(x) for x in outputs]  # n x (B, P + L, D): CLS, registers, patches
        patches = tokens[-1][:, self.encoder.num_prefix_tokens:]  # (B, L, D)
        return torch.cat([x[:, 0] for x in tokens] + [patches.mean(1)] * self.avgpool, dim=1)  # (B, D(n+a))


def embed_split(model, dataset, args, dist_env, desc):
    """Features (or logits) and labels of a whole split, each rank embedding its shard."""
    loader = common.make_loader(dataset, args.batch_size, dist_env, args.workers, train=False)
    bar = tqdm(loader, desc=desc, disable=not dist_env.is_main, leave=False)
    bar.sampler, bar.dataset = loader.sampler, loader.dataset  # what extract_features reads to gather in order
    return common.extract_features(model, bar, dist_env)


def labels_of(dataset):
    if hasattr(dataset, "targets") or hasattr(dataset, "labels"):
        return list(getattr(dataset, "targets", getattr(dataset, "labels", None)))
    return [dataset[i][1] for i in range(len(dataset))]  # shapes: labels are cheap to render


# ----------------------------------------------------------------------------- heads: probe.py trains, embed.py applies
def linear_head(dim, num_classes, batch_normalize):
    head = nn.Linear(dim, num_classes)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False), head) if batch_normalize else head


class Classifier(nn.Module):
    """Encoder + linear head for fine-tuning. global_pool (MAE's models_vit.py): the mean of the patch tokens through
    a new fc_norm replaces the CLS token through the final norm, which is dropped."""

    def __init__(self, encoder, num_classes, global_pool=False):
        super().__init__()
        self.encoder, self.global_pool = encoder, global_pool
        linear = nn.Linear(encoder.embed_dim, num_classes)
        if global_pool:
            encoder.norm = nn.Identity()  # unused, it would leave DDP waiting for its gradients
            nn.init.trunc_normal_(linear.weight, std=2e-5)  # MAE: a near-zero head, so early steps keep the features
            nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(*[nn.LayerNorm(encoder.embed_dim, eps=1e-6)] * global_pool, linear)  # fc_norm, fc

    def forward(self, images):
        if not self.global_pool:
            return self.head(self.encoder(images))
        tokens = self.encoder.forward_tokens(self.encoder.embed(images))  # (B, P + L, D): CLS, registers, patches
        return self.head(tokens[:, self.encoder.num_prefix_tokens:].mean(1))  # no final norm


HEAD_KEYS = ("protocol", "state", "classes", "readout", "batch_normalize", "recipe", "image_size", "mean", "std",
             "grayscale_input")


def save_head(path, protocol, model, args, encoder, classes, recipe, image_size, top1):
    """probe.py --save: a linear head (with its BatchNorm statistics) or a fine-tuned model, and what embed.py --head
    needs to predict as probe.py measured: the classes, the readout, the pixels, the encoder's config."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(dict(protocol=protocol, state=model.state_dict(), classes=list(classes), top1=top1,
                    encoder_config=encoder.config,
                    readout=dict(n_last_blocks=args.n_last_blocks, avgpool=args.avgpool_patchtokens),
                    batch_normalize=not args.no_linear_bn, recipe=recipe, image_size=image_size, mean=args.mean,
                    std=args.std, grayscale_input=args.grayscale_input, checkpoint=os.path.abspath(args.checkpoint)),
               path)


def saved_classifier(saved, encoder, name):
    """The model probe.py --save kept, on this encoder: images -> logits (a fine-tuned model brings its own
    encoder weights; a linear head reads the features it was trained on)."""
    if saved["protocol"] == "finetune":
        model = trained = Classifier(encoder, len(saved["classes"]), saved["recipe"] == "mae")
    else:
        readout = Readout(encoder, saved["readout"]["n_last_blocks"], saved["readout"]["avgpool"])
        trained = linear_head(readout.dim, len(saved["classes"]), saved["batch_normalize"])
        model = nn.Sequential(readout, trained)
    try:
        trained.load_state_dict(saved["state"])
    except RuntimeError as error:
        raise common.UserError(f"{name} does not fit this encoder ({str(error).splitlines()[-1].strip()[:200]})")
    return model.eval()
