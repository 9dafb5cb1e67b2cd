"""The built-in offline dataset of the quick start and the tests: `--data shapes[:SIZE[:N[:V]]]` (SIZE px, N training
and V validation images; default 32, 10000, N/5). common.build_dataset imports it for that spec only, so a copied
method file and common.py train on any other data without it."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import UserError


class Shapes(torch.utils.data.Dataset):
    """Offline and deterministic (image i is a function of split and i): one of 10 shapes (disk, ring, square, frame,
    triangle, cross, star, crescent, bar, dumbbell) with random tone, scale, position and pose on a blotchy
    background. Only the shape carries the label: the rest are the nuisances the views teach invariance to."""

    def __init__(self, split="train", image_size=32, num_images=10000, transform=None):
        self.split, self.image_size, self.num_images, self.transform = split, image_size, num_images, transform

    rendered = {}  # (split, size, index) -> (image, label), per process: rendering costs about as much as augmenting

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        key = (self.split, self.image_size, index)
        if key not in self.rendered:
            rng = np.random.default_rng([0 if self.split == "train" else 1, index])
            label = int(rng.integers(10))
            self.rendered[key] = Image.fromarray(self.render(label, rng, self.image_size)), label
        image, label = self.rendered[key]
        return (self.transform(image) if self.transform else image), label

    @staticmethod
    def render(label, rng, size):
        n = 2 * size  # drawn at 2x and average-pooled: anti-aliased edges
        ys, xs = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
        # Pose ±20°: no more, or a square and a cross would differ only by a rotation, which no SSL view teaches.
        angle, scale = rng.uniform(-0.35, 0.35), rng.uniform(0.45, 0.75)
        cx, cy = rng.uniform(-0.95 + scale, 0.95 - scale, size=2)
        u = ((xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)) / scale  # shape frame, unit radius
        v = (-(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)) / scale
        r, theta, box = np.hypot(u, v), np.arctan2(v, u), np.maximum(abs(u), abs(v))
        mask = [r < 1, (r < 1) & (r > 0.6), box < 0.8, (box < 0.85) & (box > 0.55),  # disk, ring, square, frame
                np.max([u * np.cos(a) + v * np.sin(a) for a in (0, 2.09, 4.19)], 0) < 0.5,  # triangle
                (np.minimum(abs(u), abs(v)) < 0.3) & (box < 0.95), r < 0.55 + 0.4 * np.cos(5 * theta),  # cross, star
                (r < 1) & (np.hypot(u - 0.5, v) > 0.8), (abs(u) < 1) & (abs(v) < 0.28),  # crescent, bar
                (np.hypot(abs(u) - 0.6, v) < 0.4) | ((abs(u) < 0.6) & (abs(v) < 0.12)),  # dumbbell
                ][label].astype(np.float32)[..., None]
        # Two tones, light on dark or dark on light, slightly tinted: with 8 colours, the colour pairs told the views of
        # an image apart from the rest of a batch, and SimCLR learned colour, not shape (k-NN 17% vs 41% now).
        tones = np.array([[.9, .9, .9], [.1, .1, .1]])
        foreground, background = tones[rng.choice(2, 2, replace=False)] + rng.uniform(-0.08, 0.08, (2, 3))
        blotches = torch.from_numpy(rng.uniform(-0.15, 0.15, size=(1, 3, 4, 4)))  # smooth: no texture to match views by
        blotches = F.interpolate(blotches, size=(n, n), mode="bilinear", align_corners=True)[0].permute(1, 2, 0).numpy()
        image = mask * foreground + (1 - mask) * (background + blotches)
        image = image.reshape(size, 2, size, 2, 3).mean((1, 3)) + rng.normal(0, 0.03, (size, size, 3))
        return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def spec(text):
    """'shapes[:SIZE[:N[:V]]]' -> (SIZE, N, V), defaults 32 px, 10000 train, N/5 val."""
    try:
        fields = [int(field) for field in text.split(":")[1:]]
    except ValueError:
        fields = [0]  # not a number: refused below
    if len(fields) > 3 or min(fields, default=1) < 1:
        raise UserError(f"--data {text!r}: expected shapes[:SIZE[:N[:V]]] with positive integers")
    size, num_train = (fields + [32, 10000][len(fields):])[:2]
    return size, num_train, fields[2] if len(fields) == 3 else max(1, num_train // 5)
