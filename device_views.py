"""The speed path, optional: views of whole batches made on the device (every image its own random parameters) from
a uint8 copy of a split that fits in memory, and SyncBatchNorm without a host read. common.py uses it when present;
without this file it falls back to DataLoader workers (PIL views) and torch's nn.SyncBatchNorm, same distribution."""
import functools
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from common import DistEnv, UserError, all_gather, blur_kernel

# ----------------------------------------------------------------------------- augmentation on the device
# At 32 px a ResNet-18 step takes less GPU time than a CPU worker needs to augment its batch with PIL. Data that fits
# in memory lives on the device as uint8, and each View is applied to whole batches, every image its own parameters.
def crop_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), device="cpu"):
    """torchvision's RandomResizedCrop for n images: area ~ U(scale), log aspect ~ U(log ratio), the first of 10
    tries that fits, else the central crop with the ratio clamped. Returns (x0, y0, w, h), each (n,)."""
    area = height * width * torch.empty(n, 10, device=device).uniform_(*scale)
    aspect = torch.empty(n, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()  # (n, 10)
    fits = (w <= width) & (h <= height) & (w > 0) & (h > 0)
    first = fits.float().argmax(1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    x0 = (torch.rand(n, device=device) * (width - w + 1)).floor()
    y0 = (torch.rand(n, device=device) * (height - h + 1)).floor()
    fallback_w = min(width, round(height * ratio[1]))
    fallback_h = min(height, round(fallback_w / ratio[0]))
    fallback = ((width - fallback_w) // 2, (height - fallback_h) // 2, fallback_w, fallback_h)
    fit = fits.any(1)  # Python numbers in torch.where: no host-to-device copy, which would block the CPU
    return tuple(torch.where(fit, v, float(f)) for v, f in zip((x0, y0, w, h), fallback))


def grayscale(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (B, 1, H, W), ITU-R 601


def adjust_hue(x, shift):
    """Rotate the hue of (B, 3, H, W) images in [0, 1] by shift (B,) turns (torchvision's HSV math)."""
    value = x.max(1)[0]  # (B, H, W)
    chroma = value - x.min(1)[0]
    r, g, b = x.unbind(1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = (torch.where(chroma > 0, hue / 6, torch.zeros_like(hue)) + shift[:, None, None]) % 1.0
    k = (torch.arange(5.0, 0.0, -2.0, device=x.device)[:, None, None] + 6 * hue[:, None]) % 6  # (B, 3, H, W), 5 3 1
    return value[:, None] - chroma[:, None] * (torch.minimum(k, 4 - k)).clamp(0, 1)


def gaussian_blur(x, sigma, kernel_size):
    """Separable blur with a per-image sigma (B,), reflect padding, as torchvision's GaussianBlur."""
    B, C, H, W = x.shape
    offsets = torch.arange(kernel_size, device=x.device) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k)
    x = F.pad(x.reshape(1, B * C, H, W), [kernel_size // 2] * 4, mode="reflect")
    x = F.conv2d(x, kernel[:, None, None, :], groups=B * C)  # (1, B*C, H', W), horizontal
    return F.conv2d(x, kernel[:, None, :, None], groups=B * C).reshape(B, C, H, W)


def cubic(x):
    """Keys' cubic with a = -0.5: the bicubic of PIL and of torch's antialiased resize (grid_sample's has -0.75)."""
    x = x.abs()
    return torch.where(x < 1, (1.5 * x - 2.5) * x * x + 1, torch.where(x < 2, ((2.5 - 0.5 * x) * x - 4) * x + 2, 0.0))


RESIZE_KERNELS = {"bilinear": lambda x: (1 - x.abs()).clamp(min=0), "bicubic": cubic}


def resize_weights(start, length, size, in_size, kernel):
    """(B, size, in_size): the weights of each output pixel on the input pixels when the crop [start, start + length)
    of each image is resized to size pixels as F.interpolate(antialias=True) does (PIL's resampling): the kernel is
    widened by the factor the crop shrinks by, a low-pass filter that keeps shrunk details from aliasing."""
    scale = (length / size)[:, None, None]  # (B, 1, 1) input pixels per output pixel
    centre = start[:, None, None] + scale * (torch.arange(size, device=start.device)[:, None] + 0.5)  # (B, size, 1)
    pixel = torch.arange(in_size, device=start.device) + 0.5  # (in_size,) pixel centres
    inside = (pixel > start[:, None, None]) & (pixel < (start + length)[:, None, None])  # (B, 1, in_size)
    weight = kernel((pixel - centre) / scale.clamp(min=1)) * inside  # (B, size, in_size)
    return weight / weight.sum(2, keepdim=True)


def resized_crop(images, box, flipped, size, kernel):
    """torchvision's resized_crop(antialias=True) of every image's box (x0, y0, w, h), mirrored where flipped: float
    (B, C, H, W) -> (B, C, size, size), batched as two matrix products (the separable filter) instead of a loop."""
    x0, y0, w, h = box
    rows = resize_weights(y0, h, size, images.shape[2], kernel)  # (B, S, H)
    cols = resize_weights(x0, w, size, images.shape[3], kernel)  # (B, S, W)
    cols = torch.where(flipped[:, None, None], cols.flip(1), cols)  # a mirrored view: its columns in reverse
    return rows[:, None] @ images @ cols.transpose(1, 2)[:, None]  # (B, 1, S, H) @ (B, C, H, W) @ (B, 1, W, S)


@functools.lru_cache
def on_device(values, device):
    """A constant tuple as a (n, 1, 1) tensor on device, made once: a host-to-device copy per batch blocks the CPU."""
    return torch.tensor(values, device=device)[:, None, None]


def augment_batch(images, view):
    """The View's distribution on a (B, 3, H, W) uint8 batch on any device -> normalised float views. What cannot
    happen (probability 0, no jitter strength) is not computed, but its random numbers are still drawn: the numbers
    drawn after them, and so a seed's views, do not depend on which operations a View turns off."""
    B, _, H, W = images.shape
    device, S = images.device, view.size
    chance = lambda p: torch.rand(B, device=device) < p
    per_image = lambda t: t[:, None, None, None]

    def sometimes(p, transform, x):  # transform(x) where drawn with probability p; p = 0 computes nothing
        drawn = chance(p)
        return torch.where(per_image(drawn), transform(x), x) if p > 0 else x
    # Random resized crop + flip as one affine resampling: output [-1, 1] -> the box in the input.
    box = x0, y0, w, h = crop_boxes(B, H, W, view.scale, device=device)
    flipped = chance(view.flip)
    flip = torch.where(flipped, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = flip * w / W, (2 * x0 + w) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * y0 + h) / H - 1
    grid = F.affine_grid(theta, (B, 3, S, S), align_corners=False)
    pixels = images.float() / 255
    x = F.grid_sample(pixels, grid, mode=view.interpolation, padding_mode="border", align_corners=False)
    # grid_sample has no antialias: a box larger than the view (DINO's local crops, --image-size below the data's)
    # would alias where torchvision's RandomResizedCrop low-passes. Those images are resized as torchvision does; the
    # others keep grid_sample's values, so that runs without shrinking (32-px data at 32 px) keep their numbers.
    kernel = RESIZE_KERNELS.get(view.interpolation)
    if kernel and max(H, W) > S:  # else no box is larger than the view: nothing to compute
        x = torch.where(per_image((w > S) | (h > S)), resized_crop(pixels, box, flipped, S, kernel), x)
    x = x.clamp(0, 1)
    if view.grayscale_input:
        x = grayscale(x).expand(-1, 3, -1, -1)  # (B, 3, S, S), three equal channels
    # Colour jitter: each image its own factors and its own order of the four adjustments.
    brightness, contrast, saturation, hue = view.jitter
    factors = torch.stack([torch.empty(B, device=device).uniform_(max(0, 1 - j), 1 + j)
                           for j in (brightness, contrast, saturation)]
                          + [torch.empty(B, device=device).uniform_(-hue, hue)], 1)  # (B, 4)
    jittered, order = chance(view.jitter_prob), torch.rand(B, 4, device=device).argsort(1)  # (B, 4)
    # At each position every image takes its own adjustment, and torch.where keeps it where drawn: boolean indexing
    # would make the CPU wait for the GPU at every step. Brightness, contrast and saturation are one blend
    # f·x + (1 - f)·target, towards 0, the grey mean or the grey image: one computation serves the three.
    for position in range(4 if view.jitter_prob > 0 else 0):
        op = order[:, position]  # (B,) 0 brightness, 1 contrast, 2 saturation, 3 hue
        if brightness or contrast or saturation:  # all 0: every factor is 1, the blend is x
            f = factors.gather(1, op[:, None])[:, :, None, None]  # (B, 1, 1, 1)
            gray = grayscale(x)  # (B, 1, S, S)
            target = torch.where(per_image(op == 1), gray.mean((1, 2, 3), keepdim=True), gray)
            target = torch.where(per_image(op == 0), 0.0, target)  # (1 - f)·0 adds ±0: f·x exactly, as x·f did
            x = torch.where(per_image(jittered & (op < 3)), (f * x + (1 - f) * target).clamp(0, 1), x)
        if hue:  # 0: torchvision's ColorJitter leaves hue out too
            x = torch.where(per_image(jittered & (op == 3)), adjust_hue(x, factors[:, 3]).clamp(0, 1), x)
    x = sometimes(view.grayscale_prob, lambda x: grayscale(x).expand(-1, 3, -1, -1), x)
    sigma = torch.empty(B, device=device).uniform_(0.1, 2.0)
    x = sometimes(view.blur, lambda x: gaussian_blur(x, sigma, blur_kernel(S)), x)
    x = sometimes(view.solarize, lambda x: torch.where(x >= 128 / 255, 1 - x, x), x)  # 128: uint8's midpoint
    # --vflip, --rot90: last, and their numbers drawn only when on, so that a seed's crops and colours are the same
    # with or without them. The views are square, and the colour operations per pixel and the blur isotropic: turned
    # here or (as torchvision) after the crop, the views have the same distribution.
    if view.vflip:
        x = torch.where(per_image(chance(0.5)), x.flip(2), x)
    if view.rot90:
        turns = torch.randint(4, (B,), device=device)
        for k in range(1, 4):  # each image is turned once, by its own k quarter turns
            x = torch.where(per_image(turns == k), x.rot90(k, (2, 3)), x)
    return (x - on_device(tuple(view.mean), device)) / on_device(tuple(view.std), device)


def free_memory(device):
    """Bytes free for a dataset on device: the GPU's free memory, or the RAM Linux reports available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def every_rank(value, dist_env):
    """Every rank's value, in rank order, on every rank. A decision taken from them all is the same everywhere; one
    that a rank took from its own value alone could differ (each sees its own free memory, its own images), and one
    rank would then call collectives that the others never call: the job would hang."""
    if dist_env.world_size == 1:
        return [value]
    values = [None] * dist_env.world_size
    dist.all_gather_object(values, value)  # NCCL: through the current device, which init_distributed set
    return values


def equal_size(dataset):
    """(H, W) of a dataset whose images all have one size, else None."""
    if isinstance(dataset, (torchvision.datasets.CIFAR10, torchvision.datasets.STL10)):
        return dataset.data.shape[1:3] if dataset.data.shape[-1] == 3 else dataset.data.shape[2:]  # CIFAR: NHWC
    if isinstance(dataset, torchvision.datasets.ImageFolder):
        try:  # folders of equal-size images (the first 1000 are checked; headers only)
            sizes = {Image.open(path).size for path, _ in dataset.samples[:1000]}
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
            return None  # the DataLoader path names the corrupt file
        return sizes.pop()[::-1] if len(sizes) == 1 else None  # PIL's size is (W, H)
    if getattr(dataset, "image_size", None):  # a dataset of equal-size images that says so (shapes.Shapes)
        return dataset.image_size, dataset.image_size
    return None


def in_memory(dataset, workers, dist_env=DistEnv()):
    """(uint8 images (N, 3, H, W), labels (N,)) of a dataset whose decoded bytes take at most half the device's free
    memory (the model and its activations need the rest), else None; every rank calls it and gets the same answer."""
    size = equal_size(dataset)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if dist_env.device.type == "cpu" else 1  # sharing the RAM
    budget = min(every_rank(free_memory(dist_env.device) / 2 / ranks_here if size else 0, dist_env))  # the tightest
    if not size or len(dataset) * 3 * size[0] * size[1] > budget:
        return None
    if isinstance(dataset, (torchvision.datasets.CIFAR10, torchvision.datasets.STL10)):  # held as arrays already
        images = torch.from_numpy(dataset.data)
        images = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images  # CIFAR is (N, H, W, 3)
        return images.contiguous(), torch.as_tensor(getattr(dataset, "targets", getattr(dataset, "labels", None)))
    # Each rank decodes (or renders) its slice, once, in parallel workers, into one preallocated tensor (no copy by
    # torch.cat), and the ranks gather the slices on the device: host memory and decoding are not repeated per rank.
    n = math.ceil(len(dataset) / dist_env.world_size)  # equal slices for all_gather, the last padded
    mine = range(dist_env.rank * n, min(len(dataset), (dist_env.rank + 1) * n))
    images, labels = torch.empty((n, 3, *size), dtype=torch.uint8), torch.zeros(n, dtype=torch.long)
    transform, dataset.transform = dataset.transform, v2.PILToTensor()
    done, unreadable = 0, None
    try:
        for batch, targets in torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), 256,
                                                          num_workers=workers):
            if batch.shape[1:] != images.shape[1:]:  # not the size of the first images (a folder's first 1000)
                break
            images[done:done + len(batch)], labels[done:done + len(batch)] = batch, targets
            done += len(batch)
    except RuntimeError as error:  # a batch of unequal sizes: the default collate cannot stack it
        if "equal size" not in str(error):
            raise
    except UserError as error:  # a corrupt image in this rank's slice: every rank stops with its name (rank 0 says it)
        unreadable = error
    finally:
        dataset.transform = transform
    outcomes = every_rank((done == len(mine), unreadable), dist_env)
    if errors := [error for _, error in outcomes if error]:
        raise errors[0]
    if not all(whole for whole, _ in outcomes):  # sizes differ after all: every rank stays on the DataLoader path
        return None
    images, labels = (all_gather(t.to(dist_env.device), keep_grad=False)[:len(dataset)] for t in (images, labels))
    return images, labels


class DeviceLoader:
    """Drop-in for the training DataLoader (same sampler, same (views, labels) batches) whose split is a uint8 tensor
    on the device, where augment_batch makes the views."""

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
            yield [augment_batch(images, view) for view in self.transform.transforms], self.labels[batch]


# ----------------------------------------------------------------------------- SyncBatchNorm without a host read
class _SyncBatchNormFunction(torch.nn.modules._functions.SyncBatchNorm):
    """torch's SyncBatchNorm autograd Function (torch/nn/modules/_functions.py) less the host read in its forward:
    after the gather, it drops the ranks with an empty batch by indexing with the mask `count_all.squeeze(-1) >= 1`,
    a result whose size only the GPU knows, so every BN layer waits for the GPU (~220 times a step for a ResNet-50
    BYOL or MoCo v3). Our loaders give every rank the same non-empty batch (drop_last, the global batch divisible by
    the ranks): the mask keeps every rank, and without it the math is torch's. Its backward is torch's, as is."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, world_size):
        if not x.is_contiguous(memory_format=torch.channels_last):  # the kernels take either layout
            x = x.contiguous()
        mean, invstd = torch.batch_norm_stats(x, eps)  # this rank's (C,), (C,)
        count = mean.new_full((1,), x.numel() // x.size(1))  # values per channel
        stats = mean.new_empty(world_size * (2 * len(mean) + 1))
        dist.all_gather_single(stats, torch.cat([mean, invstd, count]), group)  # one collective: (ranks·(2C + 1),)
        mean_all, invstd_all, count_all = stats.view(world_size, -1).split(len(mean), dim=1)  # (ranks, C, C, 1)
        counts = count_all.view(-1).to(mean.dtype if running_mean is None else running_mean.dtype)  # the kernel's
        # The global batch's mean and invstd; running_mean / running_var move by momentum, with the unbiased variance.
        mean, invstd = torch.batch_norm_gather_stats_with_counts(x, mean_all, invstd_all, running_mean, running_var,
                                                                momentum, eps, counts)
        ctx.save_for_backward(x, weight, mean, invstd, count_all.to(torch.int32))
        ctx.process_group = group
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)


class SyncBatchNorm(nn.SyncBatchNorm):
    """nn.SyncBatchNorm whose training step under several ranks runs the Function above; otherwise torch's."""

    def forward(self, x):
        group = self.process_group or dist.group.WORLD
        world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        if not self.training or world_size == 1:  # eval, or one process: torch's path, no sync
            return super().forward(x)
        momentum = self.momentum or 0.0  # from here, the bookkeeping of nn.SyncBatchNorm.forward
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average (a host read, as in torch; no layer here has it)
                momentum = 1 / self.num_batches_tracked.item()
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, *running, self.eps, momentum, group, world_size)


def convert_sync_batchnorm(module):
    """nn.SyncBatchNorm.convert_sync_batchnorm with the SyncBatchNorm above: torch's builds nn.SyncBatchNorm by name,
    not by cls, so its layers are retyped (the subclass adds no state; they keep the BN's parameters and buffers)."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for layer in module.modules():
        if type(layer) is nn.SyncBatchNorm:
            layer.__class__ = SyncBatchNorm
    return module
