"""What every method file shares, and nothing else: datasets, augmentations, backbones,
distributed set-up, schedules, the k-NN monitor and checkpoint I/O.

A method file (simclr.py, moco.py, ...) plus this file is all a project needs to copy.
This module has no argparse and no global state; it only defines things.
"""
import json
import math
import os
import shutil
import signal
import socket
from contextlib import contextmanager
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
    """Bad input (path, data, checkpoint, flags) or a run that must stop (diverged, pre-empted): scripts
    print it as one line and exit with code 1 (see error_line); argparse's own errors exit with 2."""

    def __init__(self, message):
        # DataLoader workers re-raise with the whole worker traceback as the message: keep
        # only the user-facing last line so the script still prints one clear error line.
        super().__init__(str(message).strip().splitlines()[-1].split("UserError: ")[-1])


def positive_int(text):
    """argparse types for counts (epochs, sizes) and for periods / worker counts where 0 means none:
    the ValueError becomes argparse's one-line error, never a traceback deep in the loop."""
    if int(text) < 1:
        raise ValueError(text)
    return int(text)


def non_negative_int(text):
    if int(text) < 0:
        raise ValueError(text)
    return int(text)


def positive_float(text):
    """Temperatures: τ = 0 divides by zero and the run goes on with NaN losses."""
    if not float(text) > 0:
        raise ValueError(text)
    return float(text)


# ----------------------------------------------------------------------------- data
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TONES = np.array([[.9, .9, .9], [.1, .1, .1]])  # light and dark; each image tints them slightly
SHAPE_CLASSES = ("disk", "ring", "square", "frame", "triangle", "cross", "star", "crescent", "bar", "dumbbell")


class Shapes(torch.utils.data.Dataset):
    """Built-in offline dataset: one of 10 shapes with random tone, scale, position and pose on a
    random blotchy background. Only the shape carries the label: tone, position and size are the
    nuisances the augmentations teach invariance to. Image i is a pure function of (split, i)."""

    def __init__(self, split="train", image_size=32, num_images=10000, transform=None):
        self.split, self.size, self.num_images, self.transform = split, image_size, num_images, transform

    rendered = {}  # (split, size, index) -> (image, label), per process: rendering costs about as much as augmenting

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        key = (self.split, self.size, index)
        if key not in self.rendered:
            rng = np.random.default_rng([0 if self.split == "train" else 1, index])
            label = int(rng.integers(len(SHAPE_CLASSES)))
            self.rendered[key] = Image.fromarray(self.render(label, rng, self.size)), label
        image, label = self.rendered[key]
        return (self.transform(image) if self.transform else image), label

    @staticmethod
    def render(label, rng, size):
        n = 2 * size  # draw at 2x and average-pool: anti-aliased edges
        ys, xs = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
        # Pose varies (±20°), but not so much that a square and a cross could only be told apart by
        # rotation invariance, which none of the SSL augmentations teach.
        angle, scale = rng.uniform(-0.35, 0.35), rng.uniform(0.45, 0.75)
        cx, cy = rng.uniform(-0.95 + scale, 0.95 - scale, size=2)
        u = ((xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)) / scale  # shape frame, unit radius
        v = (-(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)) / scale
        r, theta = np.hypot(u, v), np.arctan2(v, u)
        box = np.maximum(abs(u), abs(v))
        mask = [
            r < 1,                                                        # disk
            (r < 1) & (r > 0.6),                                          # ring
            box < 0.8,                                                    # square
            (box < 0.85) & (box > 0.55),                                  # frame
            np.max([u * np.cos(a) + v * np.sin(a) for a in (0, 2.09, 4.19)], 0) < 0.5,  # triangle
            (np.minimum(abs(u), abs(v)) < 0.3) & (box < 0.95),            # cross
            r < 0.55 + 0.4 * np.cos(5 * theta),                           # star
            (r < 1) & (np.hypot(u - 0.5, v) > 0.8),                       # crescent
            (abs(u) < 1) & (abs(v) < 0.28),                               # bar
            (np.hypot(abs(u) - 0.6, v) < 0.4) | ((abs(u) < 0.6) & (abs(v) < 0.12)),  # dumbbell
        ][label].astype(np.float32)
        # Two tones, light on dark or dark on light, slightly tinted. With 8 palette colours the 56
        # (shape, background) colour pairs told the two views of an image apart from the rest of a
        # batch, so instance discrimination learned colour, not shape (SimCLR's k-NN: 15% -> 17%;
        # with two tones: 29% -> 41% for the same run).
        foreground, background_colour = TONES[rng.choice(2, 2, replace=False)] + rng.uniform(-0.08, 0.08, (2, 3))
        # Textured background: smooth random blotches (a 4x4 noise grid upsampled), not a pattern
        # both views could match on instead of the shape.
        blotches = torch.from_numpy(rng.uniform(-0.15, 0.15, size=(1, 3, 4, 4)))
        blotches = F.interpolate(blotches, size=(n, n), mode="bilinear", align_corners=True)[0].permute(1, 2, 0).numpy()
        background = background_colour + blotches
        image = mask[..., None] * foreground + (1 - mask[..., None]) * background
        image = image.reshape(size, 2, size, 2, 3).mean((1, 3)) + rng.normal(0, 0.03, (size, size, 3))
        return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def read_image(path):
    """ImageFolder loader that names the corrupt (or too large) file instead of failing deep in a worker."""
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I"):  # 16/32-bit integer (16-bit PNG): PIL's convert would clip to 255
                pixels = np.asarray(image, dtype=np.float64)
                top = 65535 if image.mode.startswith("I;16") or pixels.max() > 255 else 255  # the value range
                return Image.fromarray((pixels * (255 / top)).round().clip(0, 255).astype(np.uint8)).convert("RGB")
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot read image {path}: {error}") from None


class ImageFiles(torchvision.datasets.ImageFolder):
    """ImageFolder (class folders) or, unlabelled, every image below root at any depth with label 0 (a dump
    of images). skip_bad: an unreadable file is replaced by the next readable one, so batches keep their
    size (DDP ranks stay in step); `bad` (shared with the workers) marks the files replaced."""

    def __init__(self, root, transform=None, unlabelled=False, skip_bad=False):
        self.unlabelled, self.skip_bad = unlabelled, skip_bad  # before super(): find_classes reads them
        super().__init__(root, transform, loader=read_image)
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def find_classes(self, directory):
        return ([""], {"": 0}) if self.unlabelled else super().find_classes(directory)  # "": root itself

    def __getitem__(self, index):
        for tries in range(100):
            try:
                return super().__getitem__((index + tries) % len(self.samples))
            except UserError:
                if not self.skip_bad:
                    raise
                self.bad[(index + tries) % len(self.samples)] = True
        raise UserError(f"{self.root}: 100 unreadable images in a row")


def is_unlabelled(folder):
    """A folder of images without class folders: images directly in it, or sub-folders none of which holds
    an image directly (a nested dump such as DIR/2024/05/*.jpg)."""
    image = lambda entry: entry.is_file() and entry.name.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS)  # noqa: E731
    subfolders = []
    with os.scandir(folder) as entries:  # lazily: a flat dump of 10M files answers at its first image
        for entry in entries:
            if image(entry):
                return True
            subfolders += [entry.path] if entry.is_dir() else []
    return bool(subfolders) and not any(any(image(entry) for entry in os.scandir(path)) for path in subfolders)


def report_bad_images(dataset, dist_env):
    """--skip-bad-images: one line naming how many files were replaced so far, and the first. Every rank calls
    it at the same point (each reads its own shard): their flags are combined."""
    bad = getattr(dataset, "bad", None)
    if bad is not None and dist_env.world_size > 1:
        bad = bad.to(dist_env.device, torch.uint8)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if dist_env.is_main and bad is not None and bad.any():
        first = dataset.samples[int(bad.nonzero()[0])][0]
        tqdm.write(f"skipped {int(bad.sum())} unreadable images so far (replaced by the next readable one; first: {first})")  # below the bar


@contextmanager
def socket_timeout(seconds):
    # torchvision downloads use urllib without a timeout: offline, they must fail, not hang.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def build_dataset(spec, split, transform=None, root="data", skip_bad=False):
    """spec: 'shapes[:SIZE[:N[:V]]]' (built-in, SIZE px, N train and V val images, V = N/5 unless
    given), 'cifar10', 'cifar100', 'stl10', or a folder DIR/{train,val}/<class>/* (class folders
    alone = train only; images without class folders = unlabelled, see is_unlabelled). split:
    'pretrain' (what SSL trains on: STL-10 adds its 100k unlabeled images), 'train', 'val'.
    skip_bad: unreadable images are replaced, not an error (ImageFiles)."""
    train = split in ("pretrain", "train")
    if spec.split(":")[0] == "shapes":
        size, num_train, num_val = shapes_spec(spec)
        return Shapes("train" if train else "val", size, num_train if train else num_val, transform)
    if spec in ("cifar10", "cifar100", "stl10"):
        try:
            with socket_timeout(20):
                if spec == "stl10":
                    stl_split = {"pretrain": "train+unlabeled", "train": "train", "val": "test"}[split]
                    return torchvision.datasets.STL10(root, stl_split, transform=transform, download=True)
                cls = torchvision.datasets.CIFAR10 if spec == "cifar10" else torchvision.datasets.CIFAR100
                return cls(root, train=train, transform=transform, download=True)
        except Exception as error:  # urllib, socket and integrity errors all mean "not available"
            raise UserError(f"could not load or download {spec} into {root!r} ({type(error).__name__}: "
                            f"{error}); download it where there is internet, or pass an ImageFolder path") from None
    if not os.path.isdir(spec):
        raise UserError(f"--data {spec!r}: no such folder (and not shapes, cifar10, cifar100 or stl10)")
    has_splits = os.path.isdir(os.path.join(spec, "train"))
    folder = os.path.join(spec, "train" if train else "val") if has_splits else spec
    if not train and not has_splits:
        raise UserError(f"--data {spec}: no val/ split (expected {spec}/train/<class>/ and {spec}/val/<class>/)")
    try:
        dataset = ImageFiles(folder, transform, is_unlabelled(folder), skip_bad)
        labelled_train = has_splits and not is_unlabelled(os.path.join(spec, "train"))
        train_classes = torchvision.datasets.folder.find_classes(os.path.join(spec, "train"))[1] if labelled_train else {}
    except (FileNotFoundError, OSError) as error:
        raise UserError(f"--data {folder}: {error}") from None
    if not train and len(train_classes) > 1:  # labels by class NAME, as train/ numbers them (not by val/'s own order)
        if missing := sorted(set(dataset.classes) - set(train_classes)):
            raise UserError(f"--data {spec}: val/ has classes that train/ lacks: {', '.join(missing[:5])}")
        dataset.samples = [(path, train_classes[dataset.classes[label]]) for path, label in dataset.samples]
        dataset.targets = [label for _, label in dataset.samples]
        dataset.classes, dataset.class_to_idx = sorted(train_classes, key=train_classes.get), train_classes
    return dataset


def shapes_spec(spec):
    """'shapes[:SIZE[:N[:V]]]' -> (SIZE, N, V), defaults 32 px, 10000 train, N/5 val."""
    try:
        fields = [int(field) for field in spec.split(":")[1:]]
    except ValueError:
        fields = [0]  # not a number: rejected below
    if len(fields) > 3 or min(fields, default=1) < 1:
        raise UserError(f"--data {spec!r}: expected shapes[:SIZE[:N[:V]]] with positive integers")
    size, num_train = (fields + [32, 10000][len(fields):])[:2]
    return size, num_train, fields[2] if len(fields) == 3 else max(1, num_train // 5)


def default_image_size(spec):
    """The resolution a dataset is usually trained at: shapes' own, 32 for CIFAR, 96 for STL-10,
    224 for an ImageFolder (ImageNet)."""
    if spec.split(":")[0] == "shapes":
        return shapes_spec(spec)[0]
    return {"cifar10": 32, "cifar100": 32, "stl10": 96}.get(spec, 224)


def blur_kernel(image_size):
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)  # 10% of the side (SimCLR), odd


def to_normalized_tensor(mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


@dataclass
class View:
    """One random view (SimCLR §B.9 / BYOL Table 6), as its parameters. Two executors draw from the
    same distribution: calling it runs torchvision on one PIL image (DataLoader workers), and
    augment_batch runs it on a uint8 batch already on the GPU, each image with its own parameters.
    jitter = (brightness, contrast, saturation, hue); BYOL's asymmetric pair is two Views."""
    size: int
    scale: tuple = (0.08, 1.0)
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)
    blur: float = 0.5  # probabilities of blur, solarize, jitter and grayscale
    solarize: float = 0.0
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    interpolation: str = "bilinear"
    flip: float = 0.5  # the domain switches (add_data_args): flip probability, one channel repeated, normalisation
    grayscale_input: bool = False
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __call__(self, image):
        if not hasattr(self, "_compose"):
            self._compose = v2.Compose([
                v2.ToImage(),
                *([v2.Grayscale(3)] if self.grayscale_input else []),
                v2.RandomResizedCrop(self.size, self.scale, antialias=True, interpolation=getattr(v2.InterpolationMode, self.interpolation.upper())),
                v2.RandomHorizontalFlip(self.flip),
                v2.RandomApply([v2.ColorJitter(*self.jitter)], p=self.jitter_prob),
                v2.RandomGrayscale(self.grayscale_prob),
                v2.RandomApply([v2.GaussianBlur(blur_kernel(self.size), sigma=(0.1, 2.0))], p=self.blur),
                v2.RandomSolarize(threshold=128, p=self.solarize),  # uint8 image: 128 is the midpoint
                *to_normalized_tensor(self.mean, self.std)])
        return self._compose(image)


class MultiView:
    """Applies each transform to the same image: a sample becomes a list of views."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image):
        return [t(image) for t in self.transforms]


def eval_transform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD, grayscale_input=False):
    """Resize (bicubic, as DINO's eval_knn.py / eval_linear.py and MAE's util/datasets.py) + centre crop."""
    resize = size if size <= 64 else int(size * 256 / 224)  # ImageNet's 256 -> 224 centre crop
    return v2.Compose([v2.ToImage(), *([v2.Grayscale(3)] if grayscale_input else []),
                       v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(size), *to_normalized_tensor(mean, std)])


def add_data_args(group, crop_scale=None):
    """The flags for data as it comes, the same in every method: domain switches for the views (the method's
    recipe stays the default), --val for the k-NN monitor, --skip-bad-images. crop_scale: the method's crop
    area range, if it has no crop flag of its own (MoCo's --crop-min, DINO's --*-crops-scale)."""
    if crop_scale:
        group.add_argument("--crop-scale", type=float, nargs=2, default=crop_scale, metavar=("MIN", "MAX"),
                           help="area range of the random crops; raise MIN where a small crop loses the signal (a lesion, a cell)")
    group.add_argument("--no-flip", action="store_true", help="no horizontal flip (where left and right differ: text, chest X-rays)")
    group.add_argument("--no-color", action="store_true", help="no colour jitter, grayscale or solarize (where colour is the signal: stains, spectra)")
    group.add_argument("--grayscale-input", action="store_true", help="read every image as one channel repeated 3 times (X-rays, CT)")
    group.add_argument("--mean", type=float, nargs="+", default=IMAGENET_MEAN, help="per-channel normalisation mean (1 or 3 values) "
                       "of the views and the k-NN monitor, for non-ImageNet data; keep ImageNet's with --init ImageNet weights")
    group.add_argument("--std", type=float, nargs="+", default=IMAGENET_STD, help="per-channel normalisation std (1 or 3 values)")
    group.add_argument("--val", default="", help="labelled data for the k-NN monitor when --data has no labels (any --data form "
                       "with a val split: DIR/train/<class>/ + DIR/val/<class>/, shapes, cifar10, ...; default: --data)")
    group.add_argument("--skip-bad-images", action="store_true", help="replace unreadable images by the next readable one and "
                       "count them each epoch (default: stop with one line naming the file)")


def domain_views(views, args):
    """A method's MultiView with the add_data_args switches applied to each of its Views."""
    colour_off = dict(jitter_prob=0.0, grayscale_prob=0.0, solarize=0.0) if args.no_color else {}
    return MultiView([replace(view, flip=0.0 if args.no_flip else view.flip, grayscale_input=args.grayscale_input,
                              mean=tuple(args.mean), std=tuple(args.std), **colour_off) for view in views.transforms])


def make_loader(dataset, batch_size, dist_env, workers, train=True, on_device=True):
    """Per-rank loader. Training always uses a DistributedSampler (one replica when alone) so that
    set_epoch makes the shuffle a function of the epoch: resume replays the same order. Training
    views of a dataset that fits in memory are made on the device (DeviceLoader) unless on_device
    is False."""
    views = dataset.transform.transforms if isinstance(dataset.transform, MultiView) else [dataset.transform]
    if train and on_device and all(isinstance(view, View) for view in views):
        data = in_memory(dataset, workers, dist_env.device)
        if data is not None:
            if dist_env.is_main:
                print(f"data: {len(dataset)} images ({data[0].nbytes / 2**20:.1f} MiB) held and augmented on {dist_env.device}")
            report_bad_images(dataset, dist_env)  # all decoded now: the count is final
            return DeviceLoader(*data, dataset.transform, batch_size, dist_env)
    if train and dist_env.is_main:  # --cpu-augment, another transform, or too large for half the free memory
        print(f"data: {len(dataset)} images decoded and augmented per batch by {workers} DataLoader workers per process")
    sampler = torch.utils.data.DistributedSampler(dataset, dist_env.world_size, dist_env.rank, shuffle=train)
    # Workers are not persistent: each epoch starts new ones, seeded from the main RNG the loop seeds per
    # epoch, so augmentations are a function of (seed, epoch, rank) and a resumed run replays them exactly
    # (persistent workers keep the RNG of their first epoch: a resumed run drew other crops).
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                                         pin_memory=dist_env.device.type == "cuda")
    return BadImageCount(loader, dist_env) if train and getattr(dataset, "skip_bad", False) else loader


class BadImageCount:
    """The training DataLoader, which after each pass (an epoch) prints how many images --skip-bad-images replaced."""

    def __init__(self, loader, dist_env):
        self.loader, self.dist_env, self.sampler, self.dataset = loader, dist_env, loader.sampler, loader.dataset

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        yield from self.loader
        report_bad_images(self.dataset, self.dist_env)


# ----------------------------------------------------------------------------- augmentation on the GPU
# At 32 px a ResNet-18 step takes less time on a GPU than a CPU worker needs to augment the batch
# with PIL/torchvision. For datasets that fit in memory the whole split lives on the GPU as uint8,
# and each View is applied to a batch at once, every image with its own random parameters.
def crop_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), device="cpu"):
    """torchvision's RandomResizedCrop parameters for n images: area fraction ~ U(scale), log aspect
    ~ U(log ratio), the first of 10 tries that fits, else the whole image with the ratio clamped.
    Returns (x0, y0, w, h), each (n,)."""
    area = height * width * torch.empty(n, 10, device=device).uniform_(*scale)
    aspect = torch.empty(n, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()  # (n, 10)
    fits = (w <= width) & (h <= height) & (w > 0) & (h > 0)
    first = fits.float().argmax(1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    x0 = (torch.rand(n, device=device) * (width - w + 1)).floor()
    y0 = (torch.rand(n, device=device) * (height - h + 1)).floor()
    # No try fits (rare: extreme aspect or scale > 1): the central crop with the ratio clamped.
    fallback_w = min(width, round(height * ratio[1]))
    fallback_h = min(height, round(fallback_w / ratio[0]))
    fallback = torch.tensor([(width - fallback_w) // 2, (height - fallback_h) // 2, fallback_w, fallback_h], device=device, dtype=torch.float)
    box = torch.stack([x0, y0, w, h], 1)  # (n, 4)
    return torch.where(fits.any(1, keepdim=True), box, fallback).unbind(1)


def grayscale(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (B, 1, H, W), ITU-R 601


def adjust_hue(x, shift):
    """Rotate the hue of (B, 3, H, W) images in [0, 1] by shift (B,) turns (torchvision's HSV math)."""
    value, _ = x.max(1)  # (B, H, W)
    chroma = value - x.min(1)[0]
    r, g, b = x.unbind(1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift[:, None, None]) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device)[None, :, None, None] + 6 * hue[:, None]) % 6  # (B, 3, H, W)
    return value[:, None] - chroma[:, None] * (torch.minimum(k, 4 - k)).clamp(0, 1)


def gaussian_blur(x, sigma, kernel_size):
    """Separable blur with a per-image sigma (B,), reflect padding, as torchvision's GaussianBlur."""
    B, C, H, W = x.shape
    offsets = torch.arange(kernel_size, device=x.device) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k)
    x = F.pad(x.reshape(1, B * C, H, W), [kernel_size // 2] * 4, mode="reflect")
    x = F.conv2d(x, kernel[:, None, None, :], groups=B * C)  # (1, B*C, H', W) horizontal
    return F.conv2d(x, kernel[:, None, :, None], groups=B * C).reshape(B, C, H, W)


def augment_batch(images, view):
    """The View's distribution on a (B, 3, H, W) uint8 batch on any device -> normalised float views."""
    B, _, H, W = images.shape
    device, S = images.device, view.size
    chance = lambda p: torch.rand(B, device=device) < p  # noqa: E731
    # Random resized crop + flip as one affine resampling: output [-1, 1] -> the box in the input.
    x0, y0, w, h = crop_boxes(B, H, W, view.scale, device=device)
    flip = torch.where(chance(view.flip), -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = flip * w / W, (2 * x0 + w) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * y0 + h) / H - 1
    grid = F.affine_grid(theta, (B, 3, S, S), align_corners=False)
    x = F.grid_sample(images.float() / 255, grid, mode=view.interpolation, padding_mode="border", align_corners=False).clamp(0, 1)
    if view.grayscale_input:
        x = grayscale(x).expand(-1, 3, -1, -1)  # (B, 3, S, S), three equal channels
    # Colour jitter: each image its own factors and its own order of the four adjustments.
    brightness, contrast, saturation, hue = view.jitter
    factors = [torch.empty(B, device=device).uniform_(max(0, 1 - j), 1 + j) for j in (brightness, contrast, saturation)]
    factors.append(torch.empty(B, device=device).uniform_(-hue, hue))
    adjust = [
        lambda x, f: x * f[:, None, None, None],
        lambda x, f: f[:, None, None, None] * x + (1 - f[:, None, None, None]) * grayscale(x).mean((1, 2, 3), keepdim=True),
        lambda x, f: f[:, None, None, None] * x + (1 - f[:, None, None, None]) * grayscale(x),
        adjust_hue]
    # Every adjustment runs on the whole batch and torch.where keeps it where drawn: boolean
    # indexing would make the CPU wait for the GPU at every step.
    per_image = lambda mask: mask[:, None, None, None]  # noqa: E731
    jittered, order = chance(view.jitter_prob), torch.rand(B, 4, device=device).argsort(1)  # (B, 4)
    for position in range(4):
        for op in range(4):
            x = torch.where(per_image(jittered & (order[:, position] == op)), adjust[op](x, factors[op]).clamp(0, 1), x)
    x = torch.where(per_image(chance(view.grayscale_prob)), grayscale(x).expand(-1, 3, -1, -1), x)
    sigma = torch.empty(B, device=device).uniform_(0.1, 2.0)
    x = torch.where(per_image(chance(view.blur)), gaussian_blur(x, sigma, blur_kernel(S)), x)
    solarized = per_image(chance(view.solarize)) & (x >= 128 / 255)
    x = torch.where(solarized, 1 - x, x)
    mean, std = (torch.tensor(v, device=device)[:, None, None] for v in (view.mean, view.std))
    return (x - mean) / std


def free_memory(device):
    """Bytes free for a dataset on device: the GPU's free memory, or the RAM Linux reports available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def in_memory(dataset, workers, device=torch.device("cpu")):
    """(uint8 images (N, 3, H, W), labels (N,)) of a dataset whose decoded bytes take at most half the
    device's free memory (the model and its activations need the rest), else None."""
    if isinstance(dataset, (torchvision.datasets.CIFAR10, torchvision.datasets.STL10)):
        size = dataset.data.shape[-2:] if dataset.data.shape[-1] != 3 else dataset.data.shape[1:3]
    elif isinstance(dataset, torchvision.datasets.ImageFolder):
        try:  # folders of equal-size images (the first 1000 are checked; headers only)
            sizes = {Image.open(path).size for path, _ in dataset.samples[:1000]}
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
            return None  # the DataLoader path names the corrupt file
        if len(sizes) != 1:
            return None
        size = sizes.pop()
    elif isinstance(dataset, Shapes):
        size = (dataset.size, dataset.size)
    else:
        return None
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1  # CPU ranks share the RAM
    if len(dataset) * 3 * size[0] * size[1] > free_memory(device) / 2 / ranks_here:
        return None
    if isinstance(dataset, (torchvision.datasets.CIFAR10, torchvision.datasets.STL10)):
        images = torch.from_numpy(dataset.data)
        images = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images  # CIFAR is (N, H, W, 3)
        return images.contiguous(), torch.as_tensor(getattr(dataset, "targets", getattr(dataset, "labels", None)))
    transform, dataset.transform = dataset.transform, v2.PILToTensor()
    try:  # decode (or render) every image once, in parallel
        images, labels = zip(*torch.utils.data.DataLoader(dataset, 256, num_workers=workers))
        return torch.cat(images), torch.cat(labels)
    except RuntimeError as error:  # sizes differ after all: stay on the DataLoader path
        if "equal size" in str(error):
            return None
        raise
    finally:
        dataset.transform = transform


class DeviceLoader:
    """Drop-in for the training DataLoader: same sampler, same (views, labels) batches, but the
    split is a uint8 tensor on the device and the views are made there by augment_batch."""

    def __init__(self, images, labels, transform, batch_size, dist_env):
        self.images, self.labels = images.to(dist_env.device), labels.to(dist_env.device)
        self.transform, self.batch_size = transform, batch_size
        self.sampler = torch.utils.data.DistributedSampler(range(len(images)), dist_env.world_size, dist_env.rank)

    def __len__(self):
        return len(self.sampler) // self.batch_size  # drop_last, as the training DataLoader

    def __iter__(self):
        indices = torch.tensor(list(self.sampler), device=self.images.device)
        for batch in indices[:len(self) * self.batch_size].view(len(self), self.batch_size):
            images = self.images[batch]  # (B, 3, H, W) uint8
            if isinstance(self.transform, MultiView):
                yield [augment_batch(images, view) for view in self.transform.transforms], self.labels[batch]
            else:
                yield augment_batch(images, self.transform), self.labels[batch]


# ----------------------------------------------------------------------------- backbones
class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x)  # (B, D, H/p, W/p)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, D/h)
        attention = None
        if return_attention:  # explicit softmax only when the weights are wanted (DINO maps)
            attention = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, h, N, N)
            x = attention @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on GPU
        return self.proj(x.transpose(1, 2).reshape(B, N, D)), attention


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, drop_path):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim)
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x, return_attention=False):
        y, attention = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), attention


def sincos_pos_embed(dim, grid_size):
    """Fixed 2-D sin-cos position embedding (MAE, MoCo v3): half the channels encode x, half y."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    ys, xs = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    encode = lambda pos: torch.cat([torch.sin(pos.flatten()[:, None] * omega), torch.cos(pos.flatten()[:, None] * omega)], 1)
    return torch.cat([encode(xs), encode(ys)], dim=1).float()  # (grid², D)


def resize_pos_embed(pos, h, w):
    """(1, g*g, D) patch position embeddings -> (1, h*w, D) for another grid (DINO's local crops, --init weights
    trained at another resolution). As DINO's vision_transformer.py interpolate_pos_encoding (l. 186-191): a
    scale factor of (n + 0.1)/g, not size=(h, w). The sampling positions differ, and so do the values (for a
    ViT-S/16's 96 px crops by a third of the largest entry): official weights expect these."""
    grid = math.isqrt(pos.shape[1])
    if (h, w) == (grid, grid):
        return pos
    pos = pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    pos = F.interpolate(pos, scale_factor=((h + 0.1) / grid, (w + 0.1) / grid), mode="bicubic")  # (1, D, h, w)
    return pos.flatten(2).transpose(1, 2)  # (1, h*w, D)


VIT_SIZES = {"vit_nano": (128, 4, 4),  # CPU scale: the quick start and the tests
             "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


class VisionTransformer(nn.Module):
    """ViT with timm's parameter names, so a saved state_dict loads into
    timm.create_model('vit_small_patch16_224', num_classes=0) strictly. forward() returns the CLS
    feature; embed() + forward_tokens() let MAE run the blocks on a subset of patch tokens."""

    def __init__(self, image_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, drop_path=0.0, sincos=False):
        super().__init__()
        self.embed_dim, self.patch_size, grid = embed_dim, patch_size, image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim), requires_grad=not sincos)
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if sincos:
            self.pos_embed.data[0, 1:] = sincos_pos_embed(embed_dim, grid)  # CLS position stays 0
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def embed(self, x):
        """(B, 3, H, W) -> (B, L, D) patch tokens plus their position embedding."""
        x = self.patch_embed(x)  # (B, D, h, w)
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2) + resize_pos_embed(self.pos_embed[:, 1:], h, w)  # (B, L, D)

    def forward_tokens(self, x, return_attention=False):
        """Patch tokens (B, L', D), any subset of them -> normalised (B, 1 + L', D), CLS first."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x, attention = block(x, return_attention and block is self.blocks[-1])
        return attention if return_attention else self.norm(x)

    def forward(self, x):
        return self.forward_tokens(self.embed(x))[:, 0]

    def last_attention(self, x):
        """(B, heads, 1 + L, 1 + L) attention of the last block (DINO's attention maps)."""
        return self.forward_tokens(self.embed(x), return_attention=True)


def build_encoder(arch, image_size=224, patch_size=16, drop_path=0.0, sincos=False, num_heads=None,
                  zero_init_residual=False):
    """Backbone without classifier, exposing .embed_dim. ResNets are torchvision's (fc removed);
    at 64 px and below the 7x7/2 stem + max-pool becomes a 3x3/1 stem (SimCLR's CIFAR variant),
    since 4x early downsampling would leave a 32 px image 1x1 before the last stage.
    zero_init_residual: the last BN scale of every residual block starts at 0, so each block starts
    as the identity (SimCLR, BYOL, SimSiam and MoCo ResNets). num_heads: a ViT's head count if not
    the usual one (MoCo v3's ViT-S has 12 heads, DINO's and timm's 6); it changes no weight shape."""
    if arch in ("resnet18", "resnet34", "resnet50"):
        model = getattr(torchvision.models, arch)(zero_init_residual=zero_init_residual)
        if image_size <= 64:
            model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        model.embed_dim = model.fc.in_features
        model.fc = nn.Identity()
        return model
    if arch in VIT_SIZES:
        dim, depth, heads = VIT_SIZES[arch]
        if image_size % patch_size:
            raise UserError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        return VisionTransformer(image_size, patch_size, dim, depth, num_heads or heads, drop_path=drop_path, sincos=sincos)
    raise UserError(f"unknown arch {arch!r}: choose from resnet18, resnet34, resnet50, {', '.join(VIT_SIZES)}")


ARCHS = ("resnet18", "resnet34", "resnet50", *VIT_SIZES)
WRAPPERS, PREFIXES = ("teacher", "student", "state_dict", "model"), ("module.", "backbone.", "base_encoder.", "encoder.")


def load_encoder_weights(encoder, args):
    """--init PATH: the encoder starts from PATH: a checkpoint of this project (its encoder), a
    torchvision ResNet state_dict, or a timm-named ViT state_dict, which this ViT's names are. Official files
    are unwrapped: DINO's {'teacher': {'backbone.*'}}, MoCo v3's {'state_dict': {'module.base_encoder.*'}},
    MAE's {'model': ...}. Classifier heads (fc, head) are dropped, position embeddings resized to this image
    size; every other tensor must match, else one line names the first. An MAE fine-tuned file (global pool)
    has no final norm but fc_norm, a LayerNorm of the same width that its features were trained through: it
    becomes the final norm (a file with both keeps norm). (MAE's decoder and mask token are dropped too:
    --init starts the encoder only.) Nothing is loaded when the run resumes (--resume, or
    OUTPUT_DIR/checkpoint.pth exists): the checkpoint's weights replace these."""
    path = args.init
    if not path or args.resume or os.path.exists(os.path.join(args.output_dir, "checkpoint.pth")):
        return
    state = read_torch_file(path, "--init")
    state = state["encoder"] if isinstance(state, dict) and "encoder_config" in state else state  # a project checkpoint
    while isinstance(state, dict) and (wrapper := next((k for k in WRAPPERS if isinstance(state.get(k), dict)), None)):
        state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--init {path}: holds no state_dict of tensors")
    for prefix in PREFIXES:  # DDP's module.*, then the method's wrapper around the encoder
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "fc_norm.weight" in state and "norm.weight" not in state:  # MAE fine-tuned with global pool (models_vit.py)
        state = {"norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.", "fc_norm.", "decoder", "mask_token"))}
    expected = encoder.state_dict()
    if "pos_embed" in state and "pos_embed" in expected and state["pos_embed"].shape[1] != expected["pos_embed"].shape[1]:
        grid = math.isqrt(expected["pos_embed"].shape[1] - 1)  # trained at another image size: resize the grid
        state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], resize_pos_embed(state["pos_embed"][:, 1:], grid, grid)], 1)
    problems = ([f"{k} is {list(state[k].shape)} in the file, {list(v.shape)} here" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
                + [f"{k} is missing" for k in expected if k not in state] + [f"{k} is unexpected" for k in state if k not in expected])
    if problems:
        raise UserError(f"--init {path} does not fit this encoder: {problems[0]} ({len(problems)} keys differ); "
                        "check --arch, --patch-size and, for a 224-px ResNet, an --image-size above 64 (the 7x7 stem)")
    if not all_finite(state):
        raise UserError(f"--init {path}: non-finite (NaN or inf) weights")
    encoder.load_state_dict(state)


def mlp(dims, last_bn=True, last_affine=False, last_bias=False):
    """Linear-BN-ReLU layers (SimCLR / BYOL / SimSiam / MoCo v3 heads); biases are dropped where BN
    follows, and on the last layer unless last_bias (SimSiam's predictor has one). dims = (in, hidden, ..., out)."""
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

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one plain process.
    NCCL on CUDA, gloo on CPU (which is how the tests run 2 ranks on a laptop)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return DistEnv(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def all_gather(x, keep_grad):
    """Concatenate x (N, ...) from every rank -> (world * N, ...), rank order. keep_grad=True
    back-propagates into every rank's input (SimCLR negatives); False is a constant (MoCo keys)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x if keep_grad else x.detach()
    if keep_grad:
        return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.detach().contiguous())
    return torch.cat(gathered, dim=0)


# ----------------------------------------------------------------------------- optimisation
def cosine_schedule(step, total_steps, start, end, warmup_steps=0, warmup_from=0.0):
    """Linear warm-up from warmup_from to start, then half a cosine from start to end."""
    if step < warmup_steps:
        return warmup_from + (start - warmup_from) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay):
    """Biases and norm parameters (the 1-D tensors) get no weight decay and, with LARS, no
    trust-ratio adaptation (SimCLR / BYOL)."""
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
        # _foreach ops: one kernel per operation over all tensors, not one per tensor (a ResNet-50
        # has 161 of them, and per-tensor launches would cost more than a 32 px forward pass).
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = torch._foreach_add([p.grad for p in params], params, alpha=group["weight_decay"])
            if not group["lars_exclude"]:
                w_norm, u_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(updates))
                trust = torch.where((w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm, 1.0)
                torch._foreach_mul_(updates, list(trust.unbind()))
            buffers = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])


def embedding_std(z):
    """Collapse signal (SimSiam §4.1): mean per-dimension std of the L2-normalised outputs,
    about 1/sqrt(d) when they spread over the sphere, 0 when every image maps to one point."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean().item()


def collapse_warning(std, dim):
    """A loud message when embedding_std has fallen far below the healthy 1/sqrt(dim) or is NaN, else None."""
    if not std * math.sqrt(dim) >= 0.1:  # written so that NaN warns too
        return (f"WARNING: representation collapse: embedding_std {std:.4f} is below 0.1/sqrt({dim}) = "
                f"{0.1 / math.sqrt(dim):.4f} (healthy ≈ {1 / math.sqrt(dim):.4f}); outputs are nearly constant")
    return None


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def extract_features(encoder, loader, dist_env):
    """Features and labels of a whole split in dataset order, on every rank. Each rank embeds
    its shard (the eval DistributedSampler pads it to equal size) and all ranks gather."""
    encoder.eval()
    features, labels = [], []
    for images, targets in loader:  # fp32, as DINO's eval_knn.py: a k-NN ranks near-equal cosines
        features.append(encoder(images.to(dist_env.device, non_blocking=True)).float())
        labels.append(targets.to(dist_env.device))
    features, labels = torch.cat(features), torch.cat(labels)
    indices = torch.tensor(list(iter(loader.sampler)), device=dist_env.device)
    features, labels, indices = (all_gather(t, keep_grad=False) for t in (features, labels, indices))
    out_features = torch.empty(len(loader.dataset), features.shape[1], device=features.device)
    out_labels = torch.empty(len(loader.dataset), dtype=torch.long, device=features.device)
    out_features[indices], out_labels[indices] = features, labels  # padded duplicates rewrite equal values
    return out_features, out_labels


def knn_classify(train_features, train_labels, test_features, k=20, temperature=0.07, num_classes=None):
    """Weighted k-NN (Wu et al. 2018, as in DINO): cosine similarity to the training set, the k
    nearest vote for their class with weight exp(s / T). Returns class scores (N_test, C)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train_features = F.normalize(train_features, dim=1)
    scores = []
    for chunk in F.normalize(test_features, dim=1).split(1024):  # bounds the (chunk, N_train) matrix
        similarity, neighbours = (chunk @ train_features.T).topk(min(k, len(train_features)), dim=1)  # (n, k)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp()))  # (n, C)
    return torch.cat(scores)


def knn_monitor(encoder, args, batch_size, dist_env, k=20):
    """Top-1 k-NN accuracy of encoder on the val split of --val (default: --data), features from its train
    split, with the run's normalisation; None for a folder without a val/ split (start_run says so once)."""
    data = args.val or args.data
    if os.path.isdir(data) and not os.path.isdir(os.path.join(data, "val")):
        return None
    transform = eval_transform(args.image_size, args.mean, args.std, args.grayscale_input)
    datasets = [build_dataset(data, split, transform, args.data_root, args.skip_bad_images) for split in ("train", "val")]
    classes = [len(getattr(dataset, "classes", ())) for dataset in datasets]
    if classes[0] == 1 < classes[1]:
        if dist_env.is_main:  # every train image would vote for one class: the accuracy would mean nothing
            print(f"warning: k-NN monitor off: {data}/train has one class folder or none (unlabelled), val/ has "
                  f"{classes[1]}; k-NN needs train/ labelled by the same class folders (or pass --val)")
        return None
    loaders = [make_loader(dataset, batch_size, dist_env, args.workers, train=False) for dataset in datasets]
    (train_x, train_y), (val_x, val_y) = (extract_features(encoder, loader, dist_env) for loader in loaders)
    return (knn_classify(train_x, train_y, val_x, k).argmax(1) == val_y).float().mean().item()


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
        raise UserError(f"could not write {path} (is the disk full? {error}); "
                        "the previous checkpoint is untouched") from None


def keep_snapshots(path, epoch, every, keep):
    """--save-every N: a numbered copy of checkpoint.pth every N epochs (a hard link: no extra disk until
    the rolling checkpoint moves on); --keep K: only the last K numbered copies stay."""
    if not every or epoch % every:
        return
    stem = os.path.splitext(path)[0] + "_"  # OUTPUT_DIR/checkpoint_
    try:
        os.link(path, f"{stem}{epoch:04d}.tmp")
    except OSError:  # file systems without hard links
        shutil.copyfile(path, f"{stem}{epoch:04d}.tmp")
    os.replace(f"{stem}{epoch:04d}.tmp", f"{stem}{epoch:04d}.pth")
    folder, prefix = os.path.split(stem)
    snapshots = sorted(name for name in os.listdir(folder or ".")
                       if name.startswith(prefix) and name.endswith(".pth") and name[len(prefix):-4].isdigit())
    for name in snapshots[:-keep] if keep else []:
        os.remove(os.path.join(folder, name))


def read_torch_file(path, name="checkpoint"):
    """torch.load to the CPU; a missing or unreadable file is one line."""
    if not os.path.isfile(path):
        raise UserError(f"{name} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise UserError(f"{name} {path} is not a readable torch file ({type(error).__name__}: {str(error)[:200]})") from None


def load_checkpoint(path, method=None):
    """A checkpoint of this project: {'method', 'encoder_config', 'encoder', 'args', 'epoch', ...}."""
    checkpoint = read_torch_file(path)
    if not isinstance(checkpoint, dict) or "encoder_config" not in checkpoint:
        raise UserError(f"checkpoint {path} was not written by this project's training scripts")
    if method and checkpoint.get("method") != method:
        raise UserError(f"checkpoint {path} is a {checkpoint.get('method')} checkpoint, not {method}")
    return checkpoint


def log_jsonl(path, record):
    """One JSON object per line; a non-finite number is written as null (a bare NaN is not JSON)."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- runs that must stop
def error_line(script, error):
    """What a script exits with on a UserError: sys.exit(its one line), exit code 1, printed by rank 0
    only (under torchrun the other ranks exit 1 silently instead of repeating it)."""
    return f"{script}: error: {error}" if os.environ.get("RANK", "0") == "0" else 1


def start_run(args, dist_env):
    """The checks argparse cannot make alone, and OUTPUT_DIR created and writable, so that a mistake
    fails now in one line, not after an epoch in a traceback."""
    if args.base_lr < 0:
        raise UserError(f"--base-lr {args.base_lr} is negative")
    for name in ("global_crops_scale", "local_crops_scale", "crop_scale"):  # DINO's multi-crop area ranges, --crop-scale
        low, high = getattr(args, name, (1, 1))
        if not 0 < low <= high <= 1:
            raise UserError(f"--{name.replace('_', '-')} {low} {high}: expected MIN MAX with 0 < MIN <= MAX <= 1")
    if len(args.mean) not in (1, 3) or len(args.std) not in (1, 3) or min(args.std) <= 0:
        raise UserError(f"--mean {args.mean} --std {args.std}: expected 1 or 3 values each (one is repeated), std > 0")
    args.mean, args.std = [list(v) * (3 if len(v) == 1 else 1) for v in (args.mean, args.std)]
    if args.val and not os.path.isdir(args.val) and args.val.split(":")[0] not in ("shapes", "cifar10", "cifar100", "stl10"):
        raise UserError(f"--val {args.val!r}: no such folder (and not shapes, cifar10, cifar100 or stl10)")
    knn_data = args.val or args.data
    if args.knn_every and os.path.isdir(knn_data) and not os.path.isdir(os.path.join(knn_data, "val")):
        if dist_env.is_main:  # decided once here, not silently at every k-NN epoch
            print(f"k-NN monitor off: {knn_data} has no labelled val/ split (pass --val DIR with DIR/train/<class>/ "
                  "and DIR/val/<class>/)")
        args.knn_every = 0
    if not 0 < getattr(args, "crop_min", 1) <= 1:  # MoCo's smallest crop area
        raise UserError(f"--crop-min {args.crop_min} is not an area fraction in (0, 1]")
    if args.warmup_epochs > args.epochs and dist_env.is_main:  # legal (a short test run), but rarely meant
        print(f"warning: --warmup-epochs {args.warmup_epochs} is longer than the run (--epochs {args.epochs}): "
              f"the lr never reaches base-lr x batch-size / 256")
    if dist_env.is_main:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, ".writable"), "w"):
                pass
            os.remove(os.path.join(args.output_dir, ".writable"))
        except OSError as error:
            raise UserError(f"--output-dir {args.output_dir} is not writable ({error.strerror or error})") from None


# Flags that may differ when a run resumes: where it runs and what it reports, not what it computes.
# --epochs may grow (or shrink to no less than the epochs done): the lr schedule then follows the new length.
MAY_CHANGE_ON_RESUME = ("epochs", "output_dir", "resume", "workers", "cpu_augment", "compile", "knn_every",
                        "save_every", "keep", "data_root", "attention_maps", "visualize", "val", "skip_bad_images")


def check_same_run(checkpoint, args, path):
    """Refuse to resume a run with other run-defining flags (data, model, batch, lr, ...): it would go
    on training the old weights with new settings, or fail in a size-mismatch traceback."""
    saved = checkpoint.get("args", {})
    plain = lambda value: list(value) if isinstance(value, tuple) else value  # noqa: E731  (a default tuple = a given list)
    differ = [f"--{name.replace('_', '-')} {saved[name]} (now {value})" for name, value in vars(args).items()
              if name in saved and name not in MAY_CHANGE_ON_RESUME and plain(saved[name]) != plain(value)]
    if differ:
        raise UserError(f"{path} is a run with other flags: {', '.join(differ)}; use another --output-dir, or the "
                        f"same flags (only --{', --'.join(n.replace('_', '-') for n in MAY_CHANGE_ON_RESUME)} may change)")
    if args.epochs < checkpoint["epoch"]:
        raise UserError(f"--epochs {args.epochs}: {path} has already trained {checkpoint['epoch']} epochs")


def check_finite(loss, epoch, step, lr, model=None):
    """Stop a diverged run before it can save: the last good checkpoint stays as it was. loss is the float
    the loop has already read (loss.item()), so this adds no host sync per step; before a save, model's
    parameters and buffers are checked too (one sync per epoch)."""
    weights_finite = model is None or all_finite(model.state_dict())
    if not (math.isfinite(loss) and weights_finite):
        what = f"loss {loss}" if weights_finite else "non-finite weights"
        raise UserError(f"the run diverged ({what}) at epoch {epoch + 1}, step {step}, lr {lr:.3g}; nothing was saved "
                        "(the last checkpoint is intact): try a lower --base-lr or a longer --warmup-epochs")


def all_finite(state_dict):
    floats = [t.isfinite().all() for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(floats).all()) if floats else True


class Preemption:
    """SIGTERM (what Slurm, Kubernetes and spot instances send before a kill) only sets a flag; the loop
    asks at each step boundary, and all ranks get the same answer, since one may be signalled first.
    A second SIGTERM does what it did before (by default: end the process at once)."""

    def __init__(self):
        self.signalled, self.previous = False, signal.signal(signal.SIGTERM, self.handler)

    def handler(self, signum, frame):
        if self.signalled:
            signal.signal(signal.SIGTERM, self.previous or signal.SIG_DFL)  # None: not installed from Python
            signal.raise_signal(signal.SIGTERM)
        self.signalled = True

    def __call__(self, dist_env):
        if dist_env.world_size == 1:
            return self.signalled
        flag = torch.tensor([float(self.signalled)], device=dist_env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def save_and_stop(state, path, dist_env):
    """Pre-empted: rank 0 saves the state at this step boundary (with the RNG, for an exact resume
    mid-epoch), every rank waits for it, then all exit with one line."""
    if dist_env.is_main:
        save_checkpoint(state, path)
    if dist_env.world_size > 1:
        dist.barrier()
    raise UserError(f"stopped by SIGTERM at epoch {state['epoch'] + 1}, step {state['step']}: saved {path}; "
                    "run the same command to resume")


def rng_state():
    """Every rank's RNG state (their seeds differ), gathered so that rank 0 saves all of them."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def resume_batches(batches, done, rng):
    """Resuming mid-epoch: draw and drop the `done` batches the pre-empted run had trained on (sampler,
    workers and device augmentations then stand where they stood), then restore this rank's RNG state."""
    batches = iter(batches)
    for _ in range(done):
        next(batches)
    if done:
        rng = rng[dist.get_rank() % len(rng) if dist.is_available() and dist.is_initialized() else 0]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
    yield from batches
