"""Augmentation on the device (device_views.augment_batch) draws from the same distribution as the
torchvision pipeline it replaces, with its own parameters per image, deterministically under a seed."""

import json

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms import v2

import common
import device_views
import shapes
import mae
from helpers import run_script


def test_crop_boxes_match_torchvision_random_resized_crop():
    torch.manual_seed(0)
    for height, width, scale in [(32, 32, (0.08, 1.0)), (40, 64, (0.2, 1.0)), (96, 96, (0.05, 0.4))]:
        image = torch.zeros(3, height, width)
        reference = np.array([torchvision.transforms.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3))
                              for _ in range(4000)], dtype=float)  # (i, j, h, w)
        x0, y0, w, h = (t.numpy() for t in device_views.crop_boxes(4000, height, width, scale))
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= width).all() and (y0 + h <= height).all()
        ours = {"area": w * h / (height * width), "log_aspect": np.log(w / h), "x_centre": (x0 + w / 2) / width}
        theirs = {"area": reference[:, 3] * reference[:, 2] / (height * width),
                  "log_aspect": np.log(reference[:, 3] / reference[:, 2]),
                  "x_centre": (reference[:, 1] + reference[:, 3] / 2) / width}
        for name in ours:  # same location and spread, and the spread is real (not a constant crop)
            for q in (0.1, 0.5, 0.9):
                assert abs(np.quantile(ours[name], q) - np.quantile(theirs[name], q)) < 0.04, (name, q, height, width)
            assert ours[name].std() > 0.05 and abs(ours[name].std() - theirs[name].std()) < 0.03, name
        assert ours["area"].min() >= scale[0] * 0.8 and ours["area"].max() <= scale[1] * 1.05


@pytest.mark.parametrize("shift", [-0.1, 0.03, 0.25, 0.5])
def test_hue_and_blur_equal_torchvision(shift):
    torch.manual_seed(1)
    x = torch.rand(4, 3, 16, 16)
    expected = torch.stack([v2.functional.adjust_hue(image, shift) for image in x])
    torch.testing.assert_close(device_views.adjust_hue(x, torch.full((4,), shift)), expected, atol=1e-5, rtol=1e-5)
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    expected = torch.stack([v2.functional.gaussian_blur(image, [5, 5], [s.item(), s.item()])
                            for image, s in zip(x, sigmas)])
    torch.testing.assert_close(device_views.gaussian_blur(x, sigmas, 5), expected, atol=1e-5, rtol=1e-5)


def views_statistics(views):
    """Per-view summaries a wrong distribution would move: colour means, contrast, saturation, and each channel's
    left-right and top-bottom differences (which way the view faces)."""
    x = views * torch.tensor(common.IMAGENET_STD)[:, None, None] + torch.tensor(common.IMAGENET_MEAN)[:, None, None]
    saturation = x.max(1)[0] - x.min(1)[0]
    left, top = x.mean(2).chunk(2, dim=2), x.mean(3).chunk(2, dim=2)  # (N, 3, S/2) halves of the column, row means
    facing = [(a.mean(2) - b.mean(2)).T for a, b in (left, top)]  # 2 x (3, N)
    return torch.stack([*x.mean((2, 3)).T, x.std((1, 2, 3)), saturation.mean((1, 2)), *facing[0], *facing[1]], 1)


def noise_image(size):
    """Detail at every scale: a view that shrinks it without a low-pass filter aliases, its contrast twice
    torchvision's (which antialiases)."""
    generator = torch.Generator().manual_seed(0)
    return v2.functional.to_pil_image(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator))


def ramps_image():
    """Red brightens to the right, green downwards: the left-right and top-bottom differences tell how a view faces."""
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8)
    return v2.functional.to_pil_image(torch.stack([ramp.expand(32, 32), ramp[:, None].expand(32, 32),
                                                   ramp.new_full((32, 32), 100)]))


@pytest.mark.parametrize("view, image", [
    (common.View(24), "shapes"), (common.View(24, blur=0.1, solarize=0.2), "shapes"),
    (mae.augmentations(mae.get_args_parser().parse_args(["--data", "shapes", "--image-size", "24"])).transforms[0],
     "shapes"),
    (common.View(12, scale=(0.05, 0.4), blur=1.0), "shapes"),
    (common.View(16, scale=(0.05, 0.4), interpolation="bicubic"), "noise"),  # DINO's local crops, shrunk 2-4x
    (common.View(16), "noise"),  # SimCLR's crops at --image-size 16 of 64-px data, shrunk up to 4x
    (common.View(24, vflip=True, rot90=True), "ramps"),  # --vflip, --rot90: the ramps face all 8 ways
    (common.View(24, flip=0.0, rot90=True), "ramps"),  # quarter turns alone
    (common.View(24, flip=0.0, vflip=True, jitter_prob=0.0, grayscale_prob=0.0), "ramps")],  # --vflip --no-flip
    ids=["simclr", "byol-view2", "mae", "dino-local", "dino-local-64px", "bilinear-64px", "vflip-rot90", "rot90",
         "vflip"])
def test_same_distribution_as_torchvision_pipeline(view, image):
    image = {"shapes": lambda: shapes.Shapes("train", 32, 1)[0][0], "noise": lambda: noise_image(64),
             "ramps": ramps_image}[image]()
    torch.manual_seed(0)
    reference = views_statistics(torch.stack([view(image) for _ in range(1500)]))
    images = v2.functional.pil_to_tensor(image)[None].expand(1500, -1, -1, -1)
    ours = views_statistics(device_views.augment_batch(images, view))
    assert ours.shape == reference.shape
    # Means within 0.02 (pixels in [0, 1]) and spreads within 15%: what 1500 samples resolve.
    torch.testing.assert_close(ours.mean(0), reference.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(ours.std(0), reference.std(0), atol=0.01, rtol=0.15)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resized_crop_equals_torchvision_antialiased_resize(interpolation):
    torch.manual_seed(0)
    images = torch.rand(6, 3, 40, 64)
    box = [torch.tensor(v, dtype=torch.float) for v in  # (x0, y0, w, h): shrunk, stretched, whole, one pixel wide
           ([0, 5, 10, 3, 30, 0], [0, 2, 7, 1, 9, 0], [64, 40, 13, 8, 30, 17], [40, 31, 9, 20, 12, 40])]
    flipped = torch.tensor([False, True, False, True, False, True])
    mode = getattr(v2.InterpolationMode, interpolation.upper())
    for size in (16, 24):
        ours = device_views.resized_crop(images, box, flipped, size, device_views.RESIZE_KERNELS[interpolation])
        expected = torch.stack([v2.functional.resized_crop(image, int(y0), int(x0), int(h), int(w), [size, size],
                                                           mode, antialias=True)
                                for image, x0, y0, w, h in zip(images, *box)])
        expected = torch.where(flipped[:, None, None, None], expected.flip(-1), expected)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_views_of_boxes_not_larger_than_the_view_keep_grid_sample_values(monkeypatch):
    """Only the images whose box is shrunk are resampled with antialias: the others, and every run whose data is
    not larger than its views, keep their numbers exactly."""
    images = v2.functional.pil_to_tensor(noise_image(32))[None].expand(64, -1, -1, -1)
    view = common.View(16, scale=(0.05, 0.4), interpolation="bicubic")
    torch.manual_seed(0)
    _, _, w, h = device_views.crop_boxes(64, 32, 32, view.scale)  # the boxes augment_batch draws first
    torch.manual_seed(0)
    antialiased = device_views.augment_batch(images, view)
    monkeypatch.setattr(device_views, "RESIZE_KERNELS", {})  # grid_sample alone, as before antialiasing
    torch.manual_seed(0)
    same = (device_views.augment_batch(images, view) == antialiased).flatten(1).all(1)
    shrunk = (w > 16) | (h > 16)
    assert 0 < shrunk.sum() < 64 and torch.equal(same, ~shrunk)


def test_rates_of_flip_grayscale_and_jitter():
    torch.manual_seed(0)
    images = (torch.rand(1, 3, 16, 16) * 255).to(torch.uint8).expand(4000, -1, -1, -1)
    plain = common.View(16, scale=(1.0, 1.0), jitter_prob=0.0, grayscale_prob=0.0, blur=0.0)
    out = device_views.augment_batch(images, plain)  # a full crop is the image itself or its mirror image
    image = v2.functional.normalize(images[0].float() / 255, common.IMAGENET_MEAN, common.IMAGENET_STD)
    same = (out - image).abs().flatten(1).max(1)[0] < 1e-4
    mirrored = (out - image.flip(-1)).abs().flatten(1).max(1)[0] < 1e-4
    assert (same ^ mirrored).all()
    assert abs(mirrored.float().mean() - 0.5) < 0.04
    gray = device_views.augment_batch(images, common.View(16, jitter_prob=0.0, grayscale_prob=0.3, blur=0.0))
    is_gray = (gray[:, 0] * 0.229 + 0.485 - gray[:, 1] * 0.224 - 0.456).abs().flatten(1).max(1)[0] < 1e-5
    assert abs(is_gray.float().mean() - 0.3) < 0.03
    bright = common.View(16, scale=(1.0, 1.0), jitter=(0.4, 0.0, 0.0, 0.0), grayscale_prob=0.0, blur=0.0)
    ratio = (views_statistics(device_views.augment_batch(images, bright))[:, :3].mean(1)
             / views_statistics(image[None])[:, :3].mean())
    changed = (ratio - 1).abs() > 1e-3
    assert abs(changed.float().mean() - 0.8) < 0.03  # jitter applied with p 0.8 ...
    assert (ratio.min() > 0.55 and ratio.max() < 1.45
            and ratio[changed].std() > 0.15)  # ... brightness U(0.6, 1.4), clamped


def test_per_image_parameters_and_seeded_determinism():
    images = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8).expand(16, -1, -1, -1)
    torch.manual_seed(3)
    a = device_views.augment_batch(images, common.View(32))
    torch.manual_seed(3)
    b = device_views.augment_batch(images, common.View(32))
    assert torch.equal(a, b)
    distinct = {tuple(view.flatten()[:50].tolist()) for view in a}
    assert len(distinct) == 16  # the same image, 16 different views


def test_device_loader_is_chosen_for_in_memory_data_and_replays_an_epoch(tmp_path):
    dataset = common.build_dataset("shapes:16:100", "pretrain", common.MultiView([common.View(16)] * 2))
    loader = common.make_loader(dataset, 32, common.DistEnv(), workers=0)
    assert isinstance(loader, device_views.DeviceLoader) and len(loader) == 3
    cpu = common.make_loader(dataset, 32, common.DistEnv(), workers=0, on_device=False)
    assert isinstance(cpu, torch.utils.data.DataLoader) and len(cpu) == len(loader)
    epochs = []
    for _ in range(2):
        loader.sampler.set_epoch(1)
        torch.manual_seed(7)
        epochs.append([(views, labels) for views, labels in loader])
    (views, labels) = epochs[0][0]
    assert len(views) == 2 and views[0].shape == (32, 3, 16, 16) and labels.dtype == torch.long
    for (v1, l1), (v2_, l2) in zip(*epochs):
        assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(v1, v2_))
    # The device holds the dataset's own images and labels, in dataset order.
    raw = common.build_dataset("shapes:16:100", "pretrain")
    for index in (0, 57, 99):
        assert (torch.equal(loader.images[index], v2.functional.pil_to_tensor(raw[index][0]))
                and loader.labels[index] == raw[index][1])


def test_no_host_to_device_copy_per_view(monkeypatch):
    """On a GPU, torch.tensor(..., device=cuda) is a copy that makes the CPU wait: constants are made once."""
    images = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8).expand(8, -1, -1, -1)
    view = common.View(16, blur=0.5, solarize=0.2)
    device_views.augment_batch(images, view)  # the first call may make them
    made, tensor = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kwargs: made.append(kwargs) or tensor(*args, **kwargs))
    device_views.augment_batch(images, view)
    assert made == []


def test_operations_that_cannot_happen_are_skipped_but_draw_their_numbers(monkeypatch):
    images = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8).expand(8, -1, -1, -1)
    calls = {name: 0 for name in ("adjust_hue", "gaussian_blur", "grayscale")}
    for name in calls:
        function = getattr(device_views, name)
        monkeypatch.setattr(device_views, name, lambda *args, name=name, function=function:
                            calls.__setitem__(name, calls[name] + 1) or function(*args))
    plain = common.View(16, jitter_prob=0.0, grayscale_prob=0.0, blur=0.0, solarize=0.0)
    no_hue = common.View(16, jitter=(0.4, 0.4, 0.4, 0.0), grayscale_prob=0.0, blur=0.0)
    rng_after = []
    for view, expected in [(plain, dict(adjust_hue=0, gaussian_blur=0, grayscale=0)),
                           (no_hue, dict(adjust_hue=0, gaussian_blur=0, grayscale=4)),  # the blends' grey
                           (common.View(16), dict(adjust_hue=4, gaussian_blur=1, grayscale=5))]:
        calls.update(adjust_hue=0, gaussian_blur=0, grayscale=0)
        torch.manual_seed(0)
        device_views.augment_batch(images, view)
        assert calls == expected, view
        rng_after.append(torch.get_rng_state())
    # The same numbers drawn whatever is skipped: a View's coins do not depend on what another View turns off.
    assert all(torch.equal(state, rng_after[0]) for state in rng_after)


def test_in_memory_decodes_into_one_tensor_and_declines_unequal_sizes(monkeypatch):
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *args, **kwargs: pytest.fail("a second copy of the dataset"))
    images, labels = device_views.in_memory(shapes.Shapes("train", 8, 10), workers=0)
    monkeypatch.setattr(torch, "cat", cat)
    for index in (0, 9):
        image, label = shapes.Shapes("train", 8)[index]
        assert torch.equal(images[index], v2.functional.pil_to_tensor(image)) and labels[index] == label

    class Liar(torch.utils.data.Dataset):
        """Says 16 px, holds 8-px images (as a folder whose first 1000 headers are not the rest's size)."""
        image_size, transform = 16, None

        def __len__(self):
            return 10

        def __getitem__(self, index):
            return self.transform(shapes.Shapes("train", 8)[index][0]), 0
    assert device_views.in_memory(Liar(), workers=0) is None


def test_in_memory_decision_is_the_same_on_every_rank(tmp_path):
    """2 gloo ranks, each seeing its own free memory: where one has room and the other has not, both stay on the
    DataLoader path (a rank deciding alone would call collectives the other never calls: a hang, hence the timeout);
    where both have room, both hold the whole dataset in order, decoded half by each rank; a corrupt image that one
    rank decodes stops both with its name (rank 0 is the one that prints it)."""
    out = tmp_path / "chosen.json"
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/in_memory_ranks.py",
                        str(out), "1e12,1e3", "1e3,1e12", "1e12,1e12", timeout=120)
    assert result.returncode == 0, result.stderr
    ranks = json.load(open(out))
    assert ranks[0] == ranks[1], ranks
    assert [case.get("loader") for case in ranks[0]] == ["DataLoader", "DataLoader", "DeviceLoader", None]
    assert ranks[0][2]["same_data"] and ranks[0][3]["error"] == "cannot read image 8.png: truncated"
