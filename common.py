"""What the method files share, and all they import: a method file plus this one is a project's whole copy.
Part I, to read: data, views, backbones, DDP, schedules, LARS, checkpoints. Part II, to change: folder intake, --init
(weights.py reads the file), the k-NN monitor, the speed path (device_views.py) and the run harness."""
import json
import math
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision.ops import StochasticDepth
from torchvision.transforms import v2
from tqdm import tqdm


class UserError(Exception):
    """Bad input (path, data, checkpoint, flags) or a run that must stop: one line, exit with code 1 (error_line)."""

    def __init__(self, message):  # a DataLoader worker re-raises with its traceback as the message: keep the last line
        super().__init__(str(message).strip().splitlines()[-1].split("UserError: ")[-1])


# ======================================================================================= PART I: what a learner reads
# ----------------------------------------------------------------------------- data
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("shapes", "cifar10", "cifar100", "stl10")


def build_dataset(spec, split, transform=None, root="data", skip_bad=False):
    """spec: 'shapes[:SIZE[:N[:V]]]' (built in), 'cifar10', 'cifar100', 'stl10', or a folder (see folder_dataset).
    split: 'pretrain' (what SSL trains on: STL-10 adds its 100k unlabeled images), 'train', 'val', 'test' (folders)."""
    train = split in ("pretrain", "train")
    if spec.split(":")[0] == "shapes":  # the offline dataset of the quick start and the tests, in shapes.py
        import shapes
        size, num_train, num_val = shapes.spec(spec)
        return shapes.Shapes("train" if train else "val", size, num_train if train else num_val, transform)
    if spec in DATASETS:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)  # torchvision downloads have no timeout: offline, fail instead of hanging
        try:
            if spec == "stl10":
                stl_split = {"pretrain": "train+unlabeled", "train": "train", "val": "test"}[split]
                return torchvision.datasets.STL10(root, stl_split, transform=transform, download=True)
            cls = torchvision.datasets.CIFAR10 if spec == "cifar10" else torchvision.datasets.CIFAR100
            return cls(root, train=train, transform=transform, download=True)
        except Exception as error:  # urllib, socket and integrity errors all mean "not available"
            raise UserError(f"could not load or download {spec} into {root!r} ({type(error).__name__}: {error}); "
                            "download it where there is internet, or pass an ImageFolder path") from None
        finally:
            socket.setdefaulttimeout(previous)
    return folder_dataset(spec, split, transform, skip_bad)


def make_loader(dataset, batch_size, dist_env, workers, train=True, on_device=True):
    """Per-rank loader. Training uses a DistributedSampler even alone, so that set_epoch makes the order a function of
    the epoch (a resumed run replays it). Views of data that fits in memory are made on the device (device_views.py)."""
    views = dataset.transform.transforms if isinstance(dataset.transform, MultiView) else [None]
    if train and on_device and all(isinstance(view, View) for view in views) and (fast := speed_path(dist_env)):
        data = fast.in_memory(dataset, workers, dist_env)
        if data is not None:
            if dist_env.is_main:
                print(f"data: {len(dataset)} images ({data[0].nbytes / 2**20:.1f} MiB) held and augmented on "
                      f"{dist_env.device}")
            return fast.DeviceLoader(*data, dataset.transform, batch_size, dist_env)
    if train and dist_env.is_main:  # --cpu-augment, another transform, or too large for half the free memory
        print(f"data: {len(dataset)} images decoded and augmented by {workers} DataLoader workers per process")
    sampler = torch.utils.data.DistributedSampler(dataset, dist_env.world_size, dist_env.rank, shuffle=train)
    # Workers are not persistent: each epoch starts new ones, seeded from the main RNG that the loop seeds per epoch,
    # so augmentations are a function of (seed, epoch, rank) and a resumed run replays them exactly.
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                                       pin_memory=dist_env.device.type == "cuda")


# ----------------------------------------------------------------------------- views
def blur_kernel(image_size):
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)  # 10% of the side (SimCLR), odd


@dataclass
class View:
    """One random view (SimCLR §B.9, BYOL Table 6), drawn by torchvision on one PIL image when called (DataLoader
    workers) or by device_views.augment_batch on a uint8 batch on the device. BYOL's asymmetric pair is two Views."""
    size: int
    scale: tuple = (0.08, 1.0)
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    blur: float = 0.5  # probabilities of blur, solarize, jitter and grayscale
    solarize: float = 0.0
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    interpolation: str = "bilinear"
    # Domain switches (domain_views): flip probability, vertical flips, quarter turns, grayscale input, normalisation
    flip: float = 0.5
    vflip: bool = False
    rot90: bool = False
    grayscale_input: bool = False
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __call__(self, image):
        if not hasattr(self, "_compose"):
            mode = getattr(v2.InterpolationMode, self.interpolation.upper())
            self._compose = v2.Compose([
                v2.ToImage(), *([v2.Grayscale(3)] if self.grayscale_input else []),
                v2.RandomResizedCrop(self.size, self.scale, antialias=True, interpolation=mode),
                v2.RandomHorizontalFlip(self.flip), *free_orientation(self.vflip, self.rot90),
                v2.RandomApply([v2.ColorJitter(*self.jitter)], p=self.jitter_prob),
                v2.RandomGrayscale(self.grayscale_prob),
                v2.RandomApply([v2.GaussianBlur(blur_kernel(self.size), sigma=(0.1, 2.0))], p=self.blur),
                v2.RandomSolarize(threshold=128, p=self.solarize),  # uint8 image: 128 is the midpoint
                v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])
        return self._compose(image)


class MultiView:
    """Applies each View to the same image: a sample becomes a list of views."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image):
        return [t(image) for t in self.transforms]


def free_orientation(vflip, rot90):
    """--vflip (p 0.5) and --rot90 (0, 90, 180 or 270°, each p 1/4): torchvision's rotate is exact at those angles."""
    quarter_turn = v2.RandomChoice([v2.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)])
    return [v2.RandomVerticalFlip()] * vflip + [quarter_turn] * rot90


def eval_transform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD, grayscale_input=False):
    """Resize (bicubic, as DINO's eval_knn.py / eval_linear.py and MAE's util/datasets.py) + centre crop."""
    resize = size if size <= 64 else int(size * 256 / 224)  # ImageNet's 256 -> 224 centre crop
    return v2.Compose([v2.ToImage(), *([v2.Grayscale(3)] if grayscale_input else []),
                       v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def domain_views(views, args):
    """The method's views with data_args' domain switches (--no-flip, --no-color, --vflip, --rot90, ...)."""
    colour_off = dict(jitter_prob=0.0, grayscale_prob=0.0, solarize=0.0) if args.no_color else {}
    return MultiView([replace(view, flip=0.0 if args.no_flip else view.flip, vflip=args.vflip, rot90=args.rot90,
                              grayscale_input=args.grayscale_input, mean=tuple(args.mean), std=tuple(args.std),
                              **colour_off) for view in views.transforms])


# ----------------------------------------------------------------------------- backbones
class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (B,h,N,d)
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on GPU
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class LayerScale(nn.Module):  # timm's and DINOv2's name: blocks.N.ls1.gamma; CaiT / DeiT III, DINOv2
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))  # a file's gammas replace it: no run here trains one from scratch

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, drop_path, layer_scale=False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()  # timm's names: mlp.fc1, mlp.fc2
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop_path = StochasticDepth(drop_path, "row")
        self.ls1, self.ls2 = (LayerScale(dim) if layer_scale else nn.Identity() for _ in range(2))

    def forward(self, x):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def sincos_pos_embed(dim, grid_size):
    """Fixed 2-D sin-cos position embedding (MAE, MoCo v3): half the channels encode x, half y."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    ys, xs = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    angles = [pos.flatten()[:, None] * omega for pos in (xs, ys)]  # 2 x (grid², D/4)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()  # (grid², D)


def resize_pos_embed(pos, h, w, antialias=False):
    """(1, g*g, D) patch position embeddings -> (1, h*w, D) for another grid (DINO's local crops, --init weights) as
    DINO(v2)'s interpolate_pos_encoding: scale factor (n + 0.1)/g, not size=(h, w), whose values differ by a third;
    antialias: size=(h, w) antialiased, as DINOv2 with registers and timm's resample_abs_pos_embed."""
    grid = math.isqrt(pos.shape[1])
    if (h, w) == (grid, grid):
        return pos
    pos = pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    size = dict(size=(h, w)) if antialias else dict(scale_factor=((h + 0.1) / grid, (w + 0.1) / grid))
    pos = F.interpolate(pos, mode="bicubic", antialias=antialias, **size)  # (1, D, h, w)
    return pos.flatten(2).transpose(1, 2)  # (1, h*w, D)


VIT_SIZES = {"vit_nano": (128, 4, 4), "vit_tiny": (192, 12, 3),  # (width, depth, heads); nano: CPU scale, the tests
             "vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16),
             "vit_huge": (1280, 32, 16)}  # MAE's ViT-H/14
ARCHS = ("resnet18", "resnet34", "resnet50", *VIT_SIZES)


class VisionTransformer(nn.Module):
    """ViT with timm's names (a state_dict loads into timm's vit_small_patch16_224, num_classes=0, strictly); forward()
    gives the CLS feature, embed() + forward_tokens() let MAE run the blocks on a subset of the patch tokens."""

    def __init__(self, image_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path=0.0,
                 sincos=False, layer_scale=False, registers=0, cls_slot=True):
        super().__init__()
        self.embed_dim, self.patch_size, grid = embed_dim, patch_size, image_size // patch_size
        self.patch_embed = nn.Sequential()  # timm's name: patch_embed.proj
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_slot = int(cls_slot)  # 0: the CLS token has no position (timm's no_embed_class: DeiT III, reg4)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.cls_slot + grid * grid, embed_dim), requires_grad=not sincos)
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, embed_dim)) if registers else None  # DINOv2-reg
        self.num_prefix_tokens = 1 + registers  # CLS, then the registers: every readout of patch tokens skips them
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, 4.0, rate, layer_scale) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if sincos:
            self.pos_embed.data[0, self.cls_slot:] = sincos_pos_embed(embed_dim, grid)  # CLS position stays 0
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def embed(self, x):
        """(B, 3, H, W) -> (B, L, D) patch tokens plus their position embedding."""
        x = self.patch_embed(x)  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2) + resize_pos_embed(self.pos_embed[:, self.cls_slot:], *x.shape[-2:])

    def forward_tokens(self, x):
        """Patch tokens (B, L', D), any subset of them -> normalised (B, P + L', D): CLS first, then the registers,
        which have no position (DINOv2 adds them after the position embedding)."""
        prefix = self.cls_token + self.pos_embed[:, :1] if self.cls_slot else self.cls_token  # (1, 1, D)
        if self.register_tokens is not None:
            prefix = torch.cat([prefix, self.register_tokens], dim=1)  # (1, P, D)
        x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)  # (B, P + L', D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x):
        return self.forward_tokens(self.embed(x))[:, 0]


def build_encoder(arch, image_size=224, patch_size=16, drop_path=0.0, sincos=False, num_heads=None,
                  zero_init_residual=False, **layout):
    """Backbone without classifier, exposing .embed_dim. At 64 px and below a ResNet's 7x7/2 stem + max-pool becomes
    SimCLR's CIFAR stem, 3x3/1 (else a 32 px image is 1x1 before the last stage). num_heads (MoCo v3's ViT-S has 12)
    and the layout (weights.vit_layout) show in no weight's shape: they travel in the checkpoint's encoder_config."""
    if arch in ("resnet18", "resnet34", "resnet50"):
        model = getattr(torchvision.models, arch)(zero_init_residual=zero_init_residual)
        if image_size <= 64:
            model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        model.embed_dim, model.fc = model.fc.in_features, nn.Identity()
        return model
    if arch in VIT_SIZES:
        dim, depth, heads = VIT_SIZES[arch]
        if image_size % patch_size:
            raise UserError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        return VisionTransformer(image_size, patch_size, dim, depth, num_heads or heads, drop_path, sincos, **layout)
    raise UserError(f"unknown arch {arch!r}: choose from {', '.join(ARCHS)}")


def mlp(dims, last_bn=True, last_affine=False, last_bias=False):
    """Linear-BN-ReLU heads, dims = (in, hidden, ..., out); no bias before a BN, nor last unless last_bias (SimSiam)."""
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(d_in, d_out, bias=last and last_bias and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=last_affine))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    is_main = property(lambda self: self.rank == 0)  # the rank that prints and saves


def init_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK, else one plain process. NCCL on CUDA, gloo on CPU (the tests)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return DistEnv(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def all_gather(x, keep_grad):
    """x (N, ...) of every rank -> (world·N, ...); keep_grad: gradients reach each rank's x (SimCLR), or not (MoCo)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x if keep_grad else x.detach()
    if keep_grad:
        return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)
    # One contiguous buffer: a list of outputs like a channels_last x (MoCo v2's images) may be filled as NCHW bytes.
    gathered = x.new_empty((dist.get_world_size() * len(x), *x.shape[1:]))  # (world·N, ...)
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(gathered, x.detach().contiguous())  # (older torch)
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return gathered.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ----------------------------------------------------------------------------- optimisation
def cosine_schedule(step, total_steps, start, end, warmup_steps=0, warmup_from=0.0):
    """Linear warm-up from warmup_from to start, then half a cosine from start to end."""
    if step < warmup_steps:
        return warmup_from + (start - warmup_from) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay):
    """Biases and norm parameters (the 1-D tensors): no weight decay and, with LARS, no trust ratio (SimCLR, BYOL)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor step is scaled by η‖w‖/‖g + λw‖ (You et al. 2017)."""

    def __init__(self, params, lr=0.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self):
        # _foreach ops: few kernels for all tensors (a ResNet-50 has 161), not one per tensor and operation.
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = torch._foreach_add([p.grad for p in params], params, alpha=group["weight_decay"])
            if not group["lars_exclude"]:
                w_norm, u_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(updates))
                trust = torch.where((w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm, 1.0)
                torch._foreach_mul_(updates, list(trust.unbind()))
            for p in (p for p in params if "momentum_buffer" not in self.state[p]):  # once (setdefault: every step)
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(state, path):
    """Write then rename: a crash mid-save (a full disk, a kill) leaves the previous checkpoint whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as error:  # a full disk is torch's RuntimeError "unexpected pos ..."
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise UserError(f"could not write {path} (is the disk full? {error}); the previous checkpoint is "
                        "untouched") from None


def read_torch_file(path, name="checkpoint"):
    if not os.path.isfile(path):
        raise UserError(f"{name} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise UserError(f"{name} {path} is not a readable torch file ({type(error).__name__}: "
                        f"{str(error)[:200]})") from None


def load_checkpoint(path, method=None):
    """A checkpoint of this project: {'method', 'encoder_config', 'encoder', 'args', 'epoch', 'step', ...}."""
    checkpoint = read_torch_file(path)
    if not isinstance(checkpoint, dict) or "encoder_config" not in checkpoint:
        raise UserError(f"checkpoint {path} was not written by this project's training scripts")
    if method and checkpoint.get("method") != method:
        raise UserError(f"checkpoint {path} is a {checkpoint.get('method')} checkpoint, not {method}")
    return checkpoint


# ========================================================================== PART II: what one reads to change it
# ----------------------------------------------------------------------------- folder intake
def folder_dataset(spec, split, transform, skip_bad):
    """DIR/{train,val,test}/<class>/*, class folders alone (train only), or unlabelled images (at any depth)."""
    if not os.path.isdir(spec):
        raise UserError(f"--data {spec!r}: no such folder (and not {', '.join(DATASETS)})")
    train = split in ("pretrain", "train")
    if not train and not has_split(spec, split):
        raise UserError(f"--data {spec}: no {split}/ split (expected {spec}/train/<class>/ and {split}/<class>/)")
    splits = os.path.isdir(os.path.join(spec, "train"))
    folder = os.path.join(spec, "train" if train else split) if splits else spec
    try:
        dataset = ImageFiles(folder, transform, is_unlabelled(folder), skip_bad)
        labelled = splits and not is_unlabelled(os.path.join(spec, "train"))
        train_classes = torchvision.datasets.folder.find_classes(os.path.join(spec, "train"))[1] if labelled else {}
    except OSError as error:
        raise UserError(f"--data {folder}: {error}") from None
    if not train and len(train_classes) > 1:  # labels by class NAME, as train/ numbers them (not by val/'s order)
        if missing := sorted(set(dataset.classes) - set(train_classes)):
            raise UserError(f"--data {spec}: {split}/ has classes that train/ lacks: {', '.join(missing[:5])}")
        dataset.samples = [(path, train_classes[dataset.classes[label]]) for path, label in dataset.samples]
        dataset.targets = [label for _, label in dataset.samples]
        dataset.classes, dataset.class_to_idx = sorted(train_classes, key=train_classes.get), train_classes
    return dataset


def has_split(spec, split="val"):
    """A labelled val/ (test/) split: in a folder that has one; the built-in datasets have val, never test."""
    return os.path.isdir(os.path.join(spec, split)) if os.path.isdir(spec) else split == "val"


def read_image(path):
    """ImageFolder's loader, naming the corrupt (or too large) file instead of failing deep in a worker."""
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I"):  # 16/32-bit integers (16-bit PNG): PIL's convert would clip at 255
                pixels = np.asarray(image, dtype=np.float64)
                top = 65535 if image.mode.startswith("I;16") or pixels.max() > 255 else 255  # the value range
                return Image.fromarray((pixels * (255 / top)).round().clip(0, 255).astype(np.uint8)).convert("RGB")
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot read image {path}: {error}") from None


class ImageFiles(torchvision.datasets.ImageFolder):
    """ImageFolder, or unlabelled (every image below root at any depth, label 0); skip_bad: see __getitem__."""

    def __init__(self, root, transform=None, unlabelled=False, skip_bad=False):
        self.unlabelled, self.skip_bad = unlabelled, skip_bad  # before super(): find_classes reads them
        super().__init__(root, transform, loader=read_image)
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()  # seen by the workers too

    def find_classes(self, directory):
        return ([""], {"": 0}) if self.unlabelled else super().find_classes(directory)  # "": root itself

    def __getitem__(self, index):
        if not self.skip_bad or index >= len(self.samples):  # IndexError: the end of `for x in dataset`
            return super().__getitem__(index)
        for tries in range(100):  # skip_bad: the next readable image, so batches keep their size (DDP ranks in step)
            try:
                return super().__getitem__((index + tries) % len(self.samples))
            except UserError:
                self.bad[(index + tries) % len(self.samples)] = True
        raise UserError(f"{self.root}: 100 unreadable images in a row")


def is_unlabelled(folder):
    """Images directly in folder, or sub-folders none of which holds an image directly (DIR/2024/05/*.jpg)."""
    image = lambda entry: entry.is_file() and entry.name.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS)
    subfolders = []
    with os.scandir(folder) as entries:  # lazily: a flat dump of 10M files answers at its first image
        for entry in entries:
            if image(entry):
                return True
            subfolders += [entry.path] if entry.is_dir() else []
    return bool(subfolders) and not any(any(image(entry) for entry in os.scandir(path)) for path in subfolders)


def report_bad_images(dataset, dist_env):
    """--skip-bad-images: how many files were replaced so far, and the first; every rank calls it (shards combined)."""
    bad = getattr(dataset, "bad", None)
    if bad is not None and dist_env.world_size > 1:
        bad = bad.to(dist_env.device, torch.uint8)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if dist_env.is_main and bad is not None and bad.any():
        tqdm.write(f"skipped {int(bad.sum())} unreadable images so far (replaced by the next readable one; first: "
                   f"{dataset.samples[int(bad.nonzero()[0])][0]})")


# ----------------------------------------------------------------------------- weights from a file: --init
def load_encoder_weights(encoder, args):
    """--init PATH: the encoder starts from PATH's weights, read by weights.py (any public layout: see there)."""
    if args.init:
        try:
            import weights
        except ImportError:  # a method file copied with common.py alone
            raise UserError("--init needs weights.py beside common.py (it reads the files)") from None
        weights.load_init(encoder, args)


# ----------------------------------------------------------------------------- the k-NN monitor
@torch.no_grad()
def extract_features(encoder, loader, dist_env):
    """A split's features and labels in dataset order on every rank: shards broadcast into rows (no all-gather copy)."""
    encoder.eval()  # features in fp32, as DINO's eval_knn.py: a k-NN ranks near-equal cosines
    to_device = lambda t: t.to(dist_env.device, non_blocking=True)  # no host wait per batch
    pairs = [(encoder(to_device(x)).float(), to_device(y)) for x, y in loader]
    features, labels = map(torch.cat, zip(*pairs))  # (n, D), (n,): this rank's images
    indices = torch.tensor(list(iter(loader.sampler)), device=dist_env.device)  # (n,): their rows in the split
    labels, indices = all_gather(labels, keep_grad=False), all_gather(indices, keep_grad=False)  # (world·n,): small
    out_labels = labels.new_empty(len(loader.dataset))
    out_labels[indices] = labels  # padded duplicates rewrite equal values
    out_features = features.new_empty(len(loader.dataset), features.shape[1])  # (N, D)
    for rank, rows in enumerate(indices.view(dist_env.world_size, -1)):  # (n,): the rows of rank's shard
        shard = features if rank == dist_env.rank else torch.empty_like(features)
        if dist_env.world_size > 1:
            dist.broadcast(shard, src=rank)
        out_features[rows] = shard
    return out_features, out_labels


def knn_classify(train_features, train_labels, test_features, k=20, temperature=0.07, num_classes=None):
    """Weighted k-NN (Wu et al. 2018, DINO): the k nearest (cosine s) vote exp(s / T) for their class; (N_test, C)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train_features = F.normalize(train_features, dim=1)
    scores = []
    for chunk in F.normalize(test_features, dim=1).split(1024):  # bounds the (chunk, N_train) matrix
        similarity, neighbours = (chunk @ train_features.T).topk(min(k, len(train_features)), dim=1)  # (n, k)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp()))  # (n, C)
    return torch.cat(scores)


def knn_monitor(encoder, args, batch_size, dist_env, k=20):
    """k-NN top-1 on the val split of --val (default --data), its train split the memory; None without a val split."""
    data = args.val or args.data
    if not has_split(data):
        return None
    transform = eval_transform(args.image_size, args.mean, args.std, args.grayscale_input)
    datasets = [build_dataset(data, s, transform, args.data_root, args.skip_bad_images) for s in ("train", "val")]
    classes = [len(getattr(dataset, "classes", ())) for dataset in datasets]
    if classes[0] == 1 < classes[1]:
        if dist_env.is_main:  # every train image would vote for one class: the accuracy would mean nothing
            print(f"warning: k-NN monitor off: {data}/train has one class folder or none (unlabelled), val/ has "
                  f"{classes[1]}; k-NN needs train/ labelled by the same class folders (or pass --val)")
        return None
    loaders = [make_loader(dataset, batch_size, dist_env, args.workers, train=False) for dataset in datasets]
    (train_x, train_y), (val_x, val_y) = (extract_features(encoder, loader, dist_env) for loader in loaders)
    return (knn_classify(train_x, train_y, val_x, k).argmax(1) == val_y).float().mean().item()


# ----------------------------------------------------------------------------- the speed path, if present
def speed_path(dist_env=None):
    """device_views.py, or None where common.py was copied without it: DataLoader workers do the same work, slower."""
    try:
        import device_views
        return device_views
    except ImportError:
        if dist_env and dist_env.is_main:
            print("note: no device_views.py beside common.py: views made by DataLoader workers, torch's SyncBatchNorm")


def convert_sync_batchnorm(module):
    """BatchNorm -> device_views.SyncBatchNorm (torch's without its host read per layer), or torch's without it."""
    fast = speed_path()  # silent: make_loader said it
    return (fast.convert_sync_batchnorm if fast else nn.SyncBatchNorm.convert_sync_batchnorm)(module)


# ----------------------------------------------------------------------------- the run harness
def argparse_type(name, cast, accept):
    """A bad count, period or temperature fails in argparse's one line, not deep in the loop (τ = 0: NaN losses)."""
    def check(text):
        if not accept(cast(text)):  # NaN fails `> 0` too
            raise ValueError(text)
        return cast(text)
    check.__name__ = name
    return check


positive_int = argparse_type("positive_int", int, lambda n: n >= 1)
non_negative_int = argparse_type("non_negative_int", int, lambda n: n >= 0)
positive_float = argparse_type("positive_float", float, lambda x: x > 0)


def default_image_size(spec):
    if spec.split(":")[0] == "shapes":
        import shapes
        return shapes.spec(spec)[0]
    return {"cifar10": 32, "cifar100": 32, "stl10": 96}.get(spec, 224)


def data_args(parser, crop_scale=None):
    """Every method's data flags (switches off: its views). crop_scale: its crop area range, if it has no crop flag."""
    add = (g := parser.add_argument_group("data")).add_argument
    add("--data", required=True, help="shapes[:SIZE[:N[:V]]], cifar10, cifar100, stl10, or an ImageFolder root")
    add("--data-root", default="data", help="where torchvision datasets are downloaded")
    add("--image-size", type=positive_int, default=None,
        help="crop size (DINO: of the global crops; default: 224 for folders, 32 CIFAR, 96 STL-10)")
    add("--workers", type=non_negative_int, default=min(8, os.cpu_count()), help="data-loading processes per GPU")
    add("--cpu-augment", action="store_true", help="augment in DataLoader workers even if the data fits on the device")
    if crop_scale:
        add("--crop-scale", type=float, nargs=2, default=crop_scale, metavar=("MIN", "MAX"),
            help="area range of the random crops; raise MIN where a small crop loses the signal (a lesion)")
    add("--no-flip", action="store_true", help="no horizontal flip (where left and right differ: text, X-rays)")
    add("--no-color", action="store_true", help="no colour jitter, grayscale or solarize (where colour is the signal)")
    add("--vflip", action="store_true", help="also flip vertically, p 0.5 (no up or down: satellite tiles, slides)")
    add("--rot90", action="store_true", help="also turn 0, 90, 180 or 270°, p 1/4 each (orientation carries no label)")
    add("--grayscale-input", action="store_true", help="every image as one channel repeated 3 times (X-rays, CT)")
    add("--mean", type=float, nargs="+", default=IMAGENET_MEAN, help="normalisation mean (1 or 3 values) of the views "
        "and the k-NN monitor; keep ImageNet's with --init ImageNet weights")
    add("--std", type=float, nargs="+", default=IMAGENET_STD, help="normalisation std (1 or 3 values)")
    add("--val", default="", help="labelled data for the k-NN monitor (any --data with a val split; default: --data)")
    add("--skip-bad-images", action="store_true", help="replace unreadable images by the next (default: stop, name it)")
    return g


def run_args(parser, method):
    add = (g := parser.add_argument_group("run")).add_argument
    add("--output-dir", default=f"runs/{method}", help="checkpoint.pth and log.jsonl; resumes from it if present")
    add("--resume", default="", help="resume from this checkpoint instead of OUTPUT_DIR/checkpoint.pth")
    add("--save-every", type=non_negative_int, default=0, help="keep OUTPUT_DIR/checkpoint_EPOCH.pth every N epochs")
    add("--keep", type=non_negative_int, default=0, help="with --save-every: keep only the last K snapshots (0: all)")
    add("--knn-every", type=non_negative_int, default=10, help="k-NN monitor every N epochs, at init and end (0: off)")
    add("--seed", type=int, default=0, help="seed of the initialisation and of every epoch's augmentations")
    add("--compile", action="store_true", help="torch.compile the model (slow first steps, then faster)")
    add("--log-every", type=positive_int, default=50, help="read the loss and agree on SIGTERM and divergence every N "
        "steps and at each epoch's end (each read makes the CPU wait for the GPU)")
    return g


# Flags a resume may change: where it runs and what it reports, not what it computes; and --epochs (the lr follows).
MAY_CHANGE_ON_RESUME = tuple("epochs output_dir resume workers cpu_augment compile knn_every save_every keep data_root "
                             "attention_maps visualize val skip_bad_images log_every".split())


class Run:
    """What every main() repeats, once (README's Layout); main() keeps views, model, optimizer, schedules and step."""

    def __init__(self, args, method):
        self.args, self.method, self.dist = args, method, init_distributed()
        self.device, self.is_main, self.world_size = self.dist.device, self.dist.is_main, self.dist.world_size
        self.path = os.path.join(args.output_dir, "checkpoint.pth")
        self.epoch, self.step, self.rng, self.record = 0, 0, None, {}
        args.image_size = args.image_size or default_image_size(args.data)
        check_flags(args, self.dist)
        # cuDNN times its algorithms once (fixed shapes). TF32 off: bf16 autocast; fp32 on purpose (logits, DINO head).
        torch.backends.cudnn.benchmark = self.device.type == "cuda"
        if args.batch_size % self.world_size:
            raise UserError(f"--batch-size {args.batch_size} is not divisible by {self.world_size} processes")

    def say(self, *text):
        if self.is_main:
            print(*text, flush=True)

    def loader(self, views):
        """The training split with these views: this rank's share of every global batch."""
        args = self.args
        self.dataset = build_dataset(args.data, "pretrain", views, args.data_root, args.skip_bad_images)
        loader = make_loader(self.dataset, args.batch_size // self.world_size, self.dist, args.workers,
                             on_device=not args.cpu_augment)
        if len(loader) == 0:
            raise UserError(f"{len(self.dataset)} images cannot fill one batch of {args.batch_size}")
        return loader

    def prepare(self, model, optimizer, encoder, sync_bn, encoder_config=None):
        """Resume if checkpointed; return what to train (SyncBN, DDP, --compile); encoder: read by k-NN and probe.py."""
        args, cuda = self.args, self.device.type == "cuda"
        self.model, self.optimizer, self.encoder = model, optimizer, encoder
        self.encoder_config = {**(encoder_config or dict(arch=args.arch, image_size=args.image_size,
                                                         patch_size=args.patch_size)), **getattr(encoder, "layout", {})}
        self.memory_format = torch.channels_last if cuda and args.arch.startswith("resnet") else torch.preserve_format
        model.to(memory_format=self.memory_format)  # channels_last: a ResNet's convolutions on CUDA (else no change)
        if resume := args.resume or (self.path if os.path.exists(self.path) else ""):
            checkpoint = load_checkpoint(resume, self.method)
            check_same_run(checkpoint, args, resume)  # other data, model, batch or lr: refused
            model.load_state_dict(checkpoint["model"])  # target networks, queues and centres included
            optimizer.load_state_dict(checkpoint["optimizer"])
            self.epoch, self.step, self.rng = checkpoint["epoch"], checkpoint["step"], checkpoint.get("rng")
            self.say(f"resumed from {resume} at epoch {self.epoch}")
        self.trained = model
        if self.world_size > 1:
            if sync_bn and cuda:
                self.trained = convert_sync_batchnorm(model)
            elif sync_bn:  # torch's SyncBatchNorm is CUDA-only
                self.say("note: SyncBatchNorm needs CUDA; on CPU each rank normalises with its own batch statistics")
            # No buffer broadcast before every forward (32 MiB for MoCo v2's queue): buffers are equal by construction
            # (SyncBN statistics, queues, centres from all ranks) or per rank (MoCo v2's shuffled BN: rank 0's saved).
            self.trained = nn.parallel.DistributedDataParallel(self.trained, [self.device.index] if cuda else None,
                                                               broadcast_buffers=False)
        if args.compile:
            self.trained = torch.compile(self.trained)  # checkpoints keep saving `model`: plain names
        if args.knn_every and self.step == 0 and (knn := self.knn()) is not None and self.is_main:  # a fresh run
            print(f"k-NN top-1 at random init: {100 * knn:.2f}%", flush=True)
            log_jsonl(os.path.join(args.output_dir, "log.jsonl"), {"epoch": 0, "knn_top1": knn})
        self.preempted = Preemption()
        return self.trained

    def knn(self):
        return knn_monitor(self.encoder, self.args, self.args.batch_size // self.world_size, self.dist)

    def epochs(self):
        while self.epoch < self.args.epochs:
            yield self.epoch
            self.epoch += 1

    def batches(self, loader):
        """This epoch's views on the device, seeded by (seed, epoch, rank); resumed, the straight run's batches."""
        self.trained.train()
        loader.sampler.set_epoch(self.epoch)
        torch.manual_seed(self.args.seed * 100003 + self.epoch * 1000 + self.dist.rank)
        self.start, self.sums, self.summed, self.steps_per_epoch = time.time(), {}, 0, len(loader)
        self.bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{self.args.epochs}", disable=not self.is_main)
        batches, done = iter(self.bar), self.step - self.epoch * len(loader)
        for _ in range(done):  # resumed mid-epoch: draw and drop (no compute) the batches trained on
            next(batches)
        if done:  # and restore this rank's RNG as it was at the SIGTERM
            rng = self.rng[self.dist.rank % len(self.rng)]
            torch.set_rng_state(rng["cpu"])
            torch.cuda.set_rng_state_all(rng["cuda"])  # [] without a GPU: nothing
        for views, _ in batches:
            yield [v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in views]

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def step_done(self, loss, z, **extras):
        """After the optimizer step (and EMA): sum loss, z's collapse signal, 0-dim extras; read every --log-every."""
        self.step += 1
        for key, value in dict(loss=loss, embedding_std=embedding_std(z), **extras).items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().double()  # fp64: as summing Python floats
        self.summed, self.z = self.summed + 1, z.detach()  # the last batch's z: its effective rank at the epoch's end
        epoch_end = self.step % self.steps_per_epoch == 0
        if self.step % self.args.log_every and not epoch_end:
            return
        # All ranks agree (a loss or a SIGTERM may be one rank's): a non-finite loss anywhere stops all before any save.
        flags = torch.tensor([float(self.preempted.signalled), 0.0], device=self.device)
        flags[1] = (~self.sums["loss"].isfinite()).double()
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        (preempted, diverged), means = flags.tolist(), (torch.stack(list(self.sums.values())) / self.summed).tolist()
        self.means = dict(zip(self.sums, means))
        if diverged:
            loss = self.means["loss"]
            raise self.diverged(f"loss {loss}" if not math.isfinite(loss) else "a non-finite loss on another rank")
        self.bar.set_postfix(loss=f"{self.means['loss']:.3f}", lr=f"{self.lr:.3g}", refresh=False,
                             img_s=f"{self.summed * self.args.batch_size / (time.time() - self.start):.0f}")
        self.preempted.agreed = bool(preempted)
        if self.preempted.agreed and not epoch_end:  # at an epoch's end, epoch_done saves first
            rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}  # cuda: [] without a GPU
            rngs = [rng] * self.world_size
            if self.world_size > 1:  # every rank's RNG (their seeds differ), for an exact resume mid-epoch
                dist.all_gather_object(rngs, rng)
            if self.is_main:
                save_checkpoint(self.state(epoch=self.epoch, rng=rngs), self.path)
            if self.world_size > 1:
                dist.barrier()  # every rank waits for the save
            raise UserError(f"stopped by SIGTERM at epoch {self.epoch + 1}, step {self.step}: saved {self.path}; "
                            "run the same command to resume")

    def epoch_done(self, **values):
        """The epoch's record, a weight check, checkpoint, snapshots, log.jsonl, printed line; a SIGTERM stops after."""
        args = self.args
        record = dict(epoch=self.epoch + 1, **self.means, effective_rank=effective_rank(self.z).item(), lr=self.lr,
                      **values, images_per_s=self.summed * args.batch_size / (time.time() - self.start))
        if self.due(args.knn_every):
            record["knn_top1"] = self.knn()
        if not all_finite(self.model.state_dict()):  # a finite loss does not prove it: the last update can blow up
            raise self.diverged("non-finite weights")
        report_bad_images(self.dataset, self.dist)
        if self.is_main:
            save_checkpoint(self.state(epoch=self.epoch + 1), self.path)
            keep_snapshots(self.path, self.epoch + 1, args.save_every, args.keep)
            log_jsonl(os.path.join(args.output_dir, "log.jsonl"), record)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                           if v is not None))
            if warning := collapse_warning(record["embedding_std"], self.z.shape[1]):
                print(warning, flush=True)
        self.record = record
        if self.preempted.agreed and self.epoch + 1 < args.epochs:
            raise UserError(f"stopped by SIGTERM at the end of epoch {self.epoch + 1}, step {self.step}: saved "
                            f"{self.path}; run the same command to resume")

    def due(self, every):
        """Every `every` epochs and at the last one (0: never)."""
        return bool(every) and ((self.epoch + 1) % every == 0 or self.epoch + 1 == self.args.epochs)

    def finish(self):
        if self.record.get("knn_top1") is not None:
            self.say(f"k-NN top-1 (k=20) on the val split: {100 * self.record['knn_top1']:.2f}%")
        if self.world_size > 1:
            dist.destroy_process_group()

    def state(self, **position):
        return dict(method=self.method, encoder_config=self.encoder_config, encoder=self.encoder.state_dict(),
                    args=vars(self.args), model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    step=self.step, **position)

    def diverged(self, what):
        return UserError(f"the run diverged ({what}) at epoch {self.epoch + 1}, step {self.step}, lr {self.lr:.3g}; "
                         "nothing saved, the last checkpoint intact: try a lower --base-lr or a longer --warmup-epochs")


def check_flags(args, dist_env):
    """What argparse cannot check alone, and OUTPUT_DIR created and writable: a mistake fails now, in one line."""
    if args.base_lr < 0:
        raise UserError(f"--base-lr {args.base_lr} is negative")
    for name in ("global_crops_scale", "local_crops_scale", "crop_scale"):  # DINO's multi-crop, --crop-scale
        low, high = getattr(args, name, (1, 1))
        if not 0 < low <= high <= 1:
            raise UserError(f"--{name.replace('_', '-')} {low} {high}: expected MIN MAX with 0 < MIN <= MAX <= 1")
    if len(args.mean) not in (1, 3) or len(args.std) not in (1, 3) or min(args.std) <= 0:
        raise UserError(f"--mean {args.mean} --std {args.std}: expected 1 or 3 values each (one is repeated), std > 0")
    args.mean, args.std = [list(v) * (3 if len(v) == 1 else 1) for v in (args.mean, args.std)]
    if args.val and not os.path.isdir(args.val) and args.val.split(":")[0] not in DATASETS:
        raise UserError(f"--val {args.val!r}: no such folder (and not {', '.join(DATASETS)})")
    if args.knn_every and not has_split(args.val or args.data):
        if dist_env.is_main:  # decided once here, not silently at every k-NN epoch
            print(f"k-NN monitor off: {args.val or args.data} has no labelled val/ split (pass --val DIR with "
                  "DIR/train/<class>/ and DIR/val/<class>/)")
        args.knn_every = 0
    if not 0 < getattr(args, "crop_min", 1) <= 1:  # MoCo's smallest crop area
        raise UserError(f"--crop-min {args.crop_min} is not an area fraction in (0, 1]")
    frozen = getattr(args, "freeze_encoder_epochs", 0)  # --init's warm-up: the encoder stays as loaded
    if frozen and not args.init:
        raise UserError(f"--freeze-encoder-epochs {frozen} needs --init: a random encoder has no features to protect")
    if frozen >= args.epochs:
        raise UserError(f"--freeze-encoder-epochs {frozen} >= --epochs {args.epochs}: the encoder would never train")
    if args.warmup_epochs > args.epochs and dist_env.is_main:  # legal (a short test run), but rarely meant
        print(f"warning: --warmup-epochs {args.warmup_epochs} is longer than the run (--epochs {args.epochs}): the lr "
              "never reaches base-lr x batch-size / 256")
    if dist_env.is_main:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            open(os.path.join(args.output_dir, ".writable"), "w").close()
            os.remove(os.path.join(args.output_dir, ".writable"))
        except OSError as error:
            raise UserError(f"--output-dir {args.output_dir} is not writable ({error.strerror or error})") from None


def check_same_run(checkpoint, args, path):
    """Other run-defining flags (data, model, batch, lr, ...) would train the old weights on with new settings."""
    saved = checkpoint.get("args", {})
    plain = lambda value: list(value) if isinstance(value, tuple) else value  # a default tuple = a given list
    differ = [f"--{name.replace('_', '-')} {saved[name]} (now {value})" for name, value in vars(args).items()
              if name in saved and name not in MAY_CHANGE_ON_RESUME and plain(saved[name]) != plain(value)]
    if differ:
        raise UserError(f"{path} is a run with other flags: {', '.join(differ)}; use another --output-dir, or the same "
                        f"flags (only --{', --'.join(n.replace('_', '-') for n in MAY_CHANGE_ON_RESUME)} may change)")
    if args.epochs < checkpoint["epoch"]:
        raise UserError(f"--epochs {args.epochs}: {path} has already trained {checkpoint['epoch']} epochs")


def all_finite(state_dict):
    floats = [t.isfinite().all() for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(floats).all()) if floats else True


def embedding_std(z):
    """Collapse signal (SimSiam §4.1): per-dimension std of the normalised z, ≈ 1/sqrt(d) spread, 0 collapsed."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


def effective_rank(z):
    """RankMe (Garrido et al. 2023): exp(entropy of z's singular values / their sum): min(N, D) spread, 1 collapsed."""
    singular_values = torch.linalg.svdvals(z.float())  # (min(N, D),), one SVD an epoch, on the device
    p = singular_values / singular_values.sum() + 1e-7  # RankMe's ε
    return torch.exp(-(p * p.log()).sum())


def collapse_warning(std, dim):
    if not std * math.sqrt(dim) >= 0.1:  # written so that NaN warns too
        return (f"WARNING: representation collapse: embedding_std {std:.4f} is below 0.1/sqrt({dim}) = "
                f"{0.1 / math.sqrt(dim):.4f} (healthy ≈ {1 / math.sqrt(dim):.4f}); outputs are nearly constant")


def log_jsonl(path, record):
    """One JSON object per line; a non-finite number is written as null (a bare NaN is not JSON)."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


def keep_snapshots(path, epoch, every, keep):
    """--save-every N: checkpoint_EPOCH.pth every N epochs, a hard link (no extra disk); --keep K: the last K stay."""
    if not every or epoch % every:
        return
    folder, prefix = os.path.split(os.path.splitext(path)[0] + "_")  # OUTPUT_DIR, checkpoint_
    snapshot = os.path.join(folder, f"{prefix}{epoch:04d}.pth")
    try:
        os.link(path, snapshot + ".tmp")
    except OSError:  # file systems without hard links
        shutil.copyfile(path, snapshot + ".tmp")
    os.replace(snapshot + ".tmp", snapshot)
    snapshots = sorted((int(name[len(prefix):-4]), name) for name in os.listdir(folder or ".")
                       if name.startswith(prefix) and name.endswith(".pth") and name[len(prefix):-4].isdigit())
    for _, name in snapshots[:-keep] if keep else []:
        os.remove(os.path.join(folder, name))


class Preemption:
    """SIGTERM (Slurm, Kubernetes, spot instances) sets a flag for Run.step_done; a second does what it did before."""

    def __init__(self):
        self.signalled, self.agreed, self.previous = False, False, signal.signal(signal.SIGTERM, self.handler)

    def handler(self, signum, frame):
        if self.signalled:
            signal.signal(signal.SIGTERM, self.previous or signal.SIG_DFL)  # None: not installed from Python
            signal.raise_signal(signal.SIGTERM)
        self.signalled = True


def error_line(script, error):
    """sys.exit's argument on a UserError: one line from rank 0; torchrun's other ranks exit 1 silently (no copies)."""
    return f"{script}: error: {error}" if os.environ.get("RANK", "0") == "0" else 1
