"""Augmentation on the device (common.augment_batch) draws from the same distribution as the
torchvision pipeline it replaces, with its own parameters per image, deterministically under a seed."""

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms import v2

import common
import shapes
import mae


def test_crop_boxes_match_torchvision_random_resized_crop():
    torch.manual_seed(0)
    for height, width, scale in [(32, 32, (0.08, 1.0)), (40, 64, (0.2, 1.0)), (96, 96, (0.05, 0.4))]:
        image = torch.zeros(3, height, width)
        reference = np.array([torchvision.transforms.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3))
                              for _ in range(4000)], dtype=float)  # (i, j, h, w)
        x0, y0, w, h = (t.numpy() for t in common.crop_boxes(4000, height, width, scale))
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
    torch.testing.assert_close(common.adjust_hue(x, torch.full((4,), shift)), expected, atol=1e-5, rtol=1e-5)
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    expected = torch.stack([v2.functional.gaussian_blur(image, [5, 5], [s.item(), s.item()])
                            for image, s in zip(x, sigmas)])
    torch.testing.assert_close(common.gaussian_blur(x, sigmas, 5), expected, atol=1e-5, rtol=1e-5)


def views_statistics(views):
    """Per-view summaries a wrong distribution would move: colour means, contrast, saturation."""
    x = views * torch.tensor(common.IMAGENET_STD)[:, None, None] + torch.tensor(common.IMAGENET_MEAN)[:, None, None]
    saturation = x.max(1)[0] - x.min(1)[0]
    return torch.stack([*x.mean((2, 3)).T, x.std((1, 2, 3)), saturation.mean((1, 2))], 1)  # (N, 5)


@pytest.mark.parametrize("view", [common.View(24), common.View(24, blur=0.1, solarize=0.2),
                                  mae.augmentations(mae.get_args_parser().parse_args(
                                      ["--data", "shapes", "--image-size", "24"])).transforms[0],
                                  common.View(12, scale=(0.05, 0.4), blur=1.0)],
                         ids=["simclr", "byol-view2", "mae", "dino-local"])
def test_same_distribution_as_torchvision_pipeline(view):
    image = shapes.Shapes("train", 32, 1)[0][0]
    torch.manual_seed(0)
    reference = views_statistics(torch.stack([view(image) for _ in range(1500)]))
    images = v2.functional.pil_to_tensor(image)[None].expand(1500, -1, -1, -1)
    ours = views_statistics(common.augment_batch(images, view))
    assert ours.shape == reference.shape
    # Means within 0.02 (pixels in [0, 1]) and spreads within 15%: what 1500 samples resolve.
    torch.testing.assert_close(ours.mean(0), reference.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(ours.std(0), reference.std(0), atol=0.01, rtol=0.15)


def test_rates_of_flip_grayscale_and_jitter():
    torch.manual_seed(0)
    images = (torch.rand(1, 3, 16, 16) * 255).to(torch.uint8).expand(4000, -1, -1, -1)
    plain = common.View(16, scale=(1.0, 1.0), jitter_prob=0.0, grayscale_prob=0.0, blur=0.0)
    out = common.augment_batch(images, plain)  # a full crop is the image itself or its mirror image
    image = v2.functional.normalize(images[0].float() / 255, common.IMAGENET_MEAN, common.IMAGENET_STD)
    same = (out - image).abs().flatten(1).max(1)[0] < 1e-4
    mirrored = (out - image.flip(-1)).abs().flatten(1).max(1)[0] < 1e-4
    assert (same ^ mirrored).all()
    assert abs(mirrored.float().mean() - 0.5) < 0.04
    gray = common.augment_batch(images, common.View(16, jitter_prob=0.0, grayscale_prob=0.3, blur=0.0))
    is_gray = (gray[:, 0] * 0.229 + 0.485 - gray[:, 1] * 0.224 - 0.456).abs().flatten(1).max(1)[0] < 1e-5
    assert abs(is_gray.float().mean() - 0.3) < 0.03
    bright = common.View(16, scale=(1.0, 1.0), jitter=(0.4, 0.0, 0.0, 0.0), grayscale_prob=0.0, blur=0.0)
    ratio = (views_statistics(common.augment_batch(images, bright))[:, :3].mean(1)
             / views_statistics(image[None])[:, :3].mean())
    changed = (ratio - 1).abs() > 1e-3
    assert abs(changed.float().mean() - 0.8) < 0.03  # jitter applied with p 0.8 ...
    assert (ratio.min() > 0.55 and ratio.max() < 1.45
            and ratio[changed].std() > 0.15)  # ... brightness U(0.6, 1.4), clamped


def test_per_image_parameters_and_seeded_determinism():
    images = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8).expand(16, -1, -1, -1)
    torch.manual_seed(3)
    a = common.augment_batch(images, common.View(32))
    torch.manual_seed(3)
    b = common.augment_batch(images, common.View(32))
    assert torch.equal(a, b)
    distinct = {tuple(view.flatten()[:50].tolist()) for view in a}
    assert len(distinct) == 16  # the same image, 16 different views


def test_device_loader_is_chosen_for_in_memory_data_and_replays_an_epoch(tmp_path):
    dataset = common.build_dataset("shapes:16:100", "pretrain", common.MultiView([common.View(16)] * 2))
    loader = common.make_loader(dataset, 32, common.DistEnv(), workers=0)
    assert isinstance(loader, common.DeviceLoader) and len(loader) == 3
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
