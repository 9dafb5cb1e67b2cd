"""What practitioners reach for (issue 16): --init from public weights, domain switches for the views,
unlabelled folders with --val and --skip-bad-images, and the plots."""
import copy
import importlib
import json
import sys

import pytest
import torch
import torchvision
from PIL import Image

import common
import device_views
import shapes
from helpers import ROOT, error_line, run_script

METHODS = ("simclr", "moco", "byol", "simsiam", "mae", "dino")
TINY_VIT = ["--arch", "vit_nano", "--patch-size", "8", "--batch-size", "8", "--epochs", "1", "--knn-every", "0",
            "--workers", "0"]
HEADS = {"simclr": "--proj-hidden 32 --proj-dim 16", "moco": "--proj-hidden 32 --proj-dim 16",
         "byol": "--proj-hidden 32 --proj-dim 16 --pred-hidden 32",
         "simsiam": "--proj-hidden 32 --proj-dim 16 --pred-hidden 16",
         "mae": "--decoder-dim 32 --decoder-depth 1 --decoder-heads 4",
         "dino": "--out-dim 64 --head-hidden 32 --head-bottleneck 16 --local-crops 2"}


def parse(method, *argv):
    module = importlib.import_module(method)
    return module, module.get_args_parser().parse_args(list(argv))


# ----------------------------------------------------------------------------- --init
TIMM_VIT_KEYS = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                 "norm.weight", "norm.bias"] + [
    f"blocks.{i}.{name}" for i in range(4) for name in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]


def test_vit_state_dict_has_timm_names():
    """Written by hand from timm's VisionTransformer: official DINO / MAE / MoCo v3 files load without renaming."""
    assert sorted(common.build_encoder("vit_nano", 32, 8).state_dict()) == sorted(TIMM_VIT_KEYS)


def official_vit_file(path, image_size=32, wrap="dino"):
    """A timm-named ViT state_dict as official checkpoints wrap it, plus the heads --init must drop."""
    torch.manual_seed(123)
    state = common.build_encoder("vit_nano", image_size, 8).state_dict()
    extra = {"head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)}
    if wrap == "dino":  # a full DINO checkpoint: student under module.backbone., teacher under backbone.
        saved = {"teacher": {f"backbone.{k}": v for k, v in {**state, **extra}.items()},
                 "student": {f"module.backbone.{k}": v + 1 for k, v in state.items()}, "epoch": 100}
    elif wrap == "moco":  # MoCo v3: module.base_encoder.* beside the momentum encoder and the predictor
        saved = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in {**state, **extra}.items()},
                                **{f"module.momentum_encoder.{k}": v + 1 for k, v in state.items()},
                                "module.predictor.0.weight": torch.zeros(4, 4)}}
    elif wrap == "mae_finetuned":  # MAE fine-tuned with global pool: fc_norm (on the mean patch token), no norm
        fc_norm = {"fc_norm.weight": state["norm.weight"] + 0.5, "fc_norm.bias": state["norm.bias"] - 0.5}
        saved = {"model": {**{k: v for k, v in state.items() if not k.startswith("norm.")}, **fc_norm, **extra}}
    else:  # MAE: {'model': encoder + decoder}
        saved = {"model": {**state, "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 128)}}
    torch.save(saved, path)
    return state


def targets(method, model):
    """(student encoder, every copy that must start equal to it) of a built model."""
    if method == "dino":
        return model.student.backbone, [model.teacher.backbone]
    copy = {"byol": "target", "moco": "momentum_encoder"}.get(method)  # (encoder, projector) copies
    return model.encoder, [getattr(model, copy)[0]] if copy else []


@pytest.mark.parametrize("method", METHODS)
def test_init_loads_the_encoder_and_its_targets(method, tmp_path):
    weights = official_vit_file(tmp_path / "vit.pth", wrap={"dino": "dino", "moco": "moco"}.get(method, "mae"))
    module, args = parse(method, "--data", "shapes:32:16:8", *TINY_VIT, "--init", str(tmp_path / "vit.pth"),
                         "--output-dir", str(tmp_path / "run"))
    args.image_size = 32
    encoder, copies = targets(method, module.build_model(args))
    for network in [encoder, *copies]:
        assert all(torch.equal(network.state_dict()[k], v) for k, v in weights.items())


def test_init_from_an_mae_finetuned_file_takes_fc_norm_as_the_final_norm(tmp_path):
    """MAE's fine-tuned files (global pool) have no norm.*, but fc_norm.*: the LayerNorm their features were
    trained through becomes the final norm. Was refused: "norm.weight is missing". A file with both keeps its
    norm; one with neither is refused in one line naming the missing key."""
    weights = official_vit_file(tmp_path / "finetuned.pth", wrap="mae_finetuned")
    saved = torch.load(tmp_path / "finetuned.pth")["model"]
    module, args = parse("mae", "--data", "shapes:32:16:8", *TINY_VIT, "--init", str(tmp_path / "finetuned.pth"),
                         "--output-dir", str(tmp_path / "run"))
    args.image_size = 32
    encoder = module.build_model(args).encoder
    assert torch.equal(encoder.norm.weight, saved["fc_norm.weight"])
    assert torch.equal(encoder.norm.bias, saved["fc_norm.bias"])
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in weights.items() if not k.startswith("norm."))
    both = {**weights, "fc_norm.weight": saved["fc_norm.weight"], "fc_norm.bias": saved["fc_norm.bias"]}
    neither = {k: v for k, v in weights.items() if not k.startswith("norm.")}
    for name, state in (("both", both), ("neither", neither)):
        torch.save({"model": state}, tmp_path / f"{name}.pth")
        args.init = str(tmp_path / f"{name}.pth")
        if name == "both":
            assert torch.equal(module.build_model(args).encoder.norm.weight, weights["norm.weight"])
        else:
            with pytest.raises(common.UserError, match="neither.pth does not fit a vit_nano: norm.weight is missing"):
                module.build_model(args)


def test_init_resizes_position_embeddings_and_drops_heads(tmp_path):
    weights = official_vit_file(tmp_path / "vit.pth", image_size=64, wrap="moco")  # trained at 64 px, 8x8 patches
    module, args = parse("dino", "--data", "shapes:32", *TINY_VIT, "--init", str(tmp_path / "vit.pth"),
                         "--output-dir", str(tmp_path / "o"))
    args.image_size = 32
    backbone = module.build_model(args).teacher.backbone
    assert backbone.pos_embed.shape == (1, 1 + 16, 128)
    torch.testing.assert_close(backbone.pos_embed[:, 1:], common.resize_pos_embed(weights["pos_embed"][:, 1:], 4, 4))
    torch.testing.assert_close(backbone.pos_embed[:, :1], weights["pos_embed"][:, :1])  # the CLS position as it was
    assert torch.equal(backbone.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])


def test_init_from_torchvision_resnet_trains_and_resumes(tmp_path):
    """A torchvision ResNet-18 state_dict (with its fc), 72 px (the 7x7 stem): at lr 0 one step leaves the
    weights as loaded and BYOL's target equal to them; a resume keeps the checkpoint even without the file."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    flags = ["--data", "shapes:72:8:8", *TINY_VIT[:-2], "--workers", "0", "--arch", "resnet18", "--base-lr", "0",
             "--proj-hidden", "32", "--proj-dim", "16", "--pred-hidden", "32", "--init", str(tmp_path / "r18.pth"),
             "--output-dir", str(tmp_path / "run")]
    module, args = parse("byol", *flags)
    module.main(args)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)
    for name, parameter in resnet.named_parameters():
        if not name.startswith("fc."):
            assert torch.equal(checkpoint["encoder"][name], parameter.detach()), name
            torch.testing.assert_close(checkpoint["model"][f"target.0.{name}"], parameter.detach(),
                                       atol=1e-7, rtol=1e-6)  # EMA of equals
    (tmp_path / "r18.pth").unlink()  # a resume reads the checkpoint, never --init again
    module.main(parse("byol", *flags[:flags.index("--epochs") + 1], "2", *flags[flags.index("--epochs") + 2:])[1])
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)["epoch"] == 2


def test_init_from_a_project_checkpoint(tmp_path):
    weights = official_vit_file(tmp_path / "vit.pth")
    torch.save({"method": "dino", "encoder_config": {}, "encoder": weights, "model": {}}, tmp_path / "ckpt.pth")
    module, args = parse("simclr", "--data", "shapes:32", *TINY_VIT, "--init", str(tmp_path / "ckpt.pth"),
                         "--output-dir", str(tmp_path / "o"))
    args.image_size = 32
    assert all(torch.equal(module.build_model(args).encoder.state_dict()[k], v) for k, v in weights.items())


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"), (b"not torch", "not a readable torch file"),
    ("resnet", "conv1.weight is [64, 3, 7, 7] in the file, [64, 3, 3, 3] here"),
    ("vit_tiny", "cls_token is [1, 1, 192] in the file, [1, 1, 128] here")])
def test_init_mismatch_is_one_line(tmp_path, content, expected):
    path = tmp_path / "weights.pth"
    if content == "resnet":  # the 224-px stem into a 32 px (3x3 stem) ResNet
        torch.save(torchvision.models.resnet18().state_dict(), path)
    elif content == "vit_tiny":
        torch.save(common.build_encoder("vit_tiny", 32, 8).state_dict(), path)
    elif content:
        path.write_bytes(content)
    flags = ["--data", "shapes:32:16:8", *TINY_VIT, "--arch", "resnet18" if content == "resnet" else "vit_nano",
             "--init", str(path), "--output-dir", str(tmp_path / "o")]
    if content is None:  # end to end once: one line, exit code 1
        result = run_script("simclr.py", *flags)
        assert result.returncode == 1 and error_line(result) == f"simclr.py: error: --init {path}: no such file"
    module, args = parse("simclr", *flags)
    with pytest.raises(common.UserError, match="^--init") as error:
        module.main(args)
    assert expected in str(error.value) and "\n" not in str(error.value)


ENCODER = {"dino": "student.backbone."}  # where the --init weights sit in the model's state; the rest: "encoder."
EMA_COPY = {"byol": "target.0.", "moco": "momentum_encoder.0.", "dino": "teacher.backbone."}


@pytest.mark.parametrize("method", METHODS)
def test_freeze_encoder_epochs_trains_the_heads_first(method, tmp_path, monkeypatch):
    """--freeze-encoder-epochs 1 of 2: after epoch 1 the encoder (and its EMA copy) is exactly the --init file's
    while the heads moved; after epoch 2 the encoder moved too."""
    weights = official_vit_file(tmp_path / "vit.pth")
    module, args = parse(method, "--data", "shapes:32:16:8", *TINY_VIT, "--epochs", "2", "--warmup-epochs", "0",
                         "--save-every", "1", "--init", str(tmp_path / "vit.pth"), "--freeze-encoder-epochs", "1",
                         *HEADS[method].split(), "--output-dir", str(tmp_path / "run"))
    built, build_model = [], module.build_model  # keep a copy of the model as main() builds it: the heads' init
    monkeypatch.setattr(module, "build_model", lambda a: (m := build_model(a), built.append(copy.deepcopy(m)))[0])
    module.main(args)
    epoch1, epoch2 = (torch.load(tmp_path / "run" / f"checkpoint_{e:04d}.pth", weights_only=False) for e in (1, 2))
    encoder = ENCODER.get(method, "encoder.")
    for prefix in (encoder, EMA_COPY.get(method, encoder)):
        assert all(torch.equal(epoch1["model"][prefix + k], v) for k, v in weights.items()), prefix
    heads = {k: p for k, p in built[0].named_parameters() if p.requires_grad and not k.startswith(encoder)}
    assert any(not torch.equal(epoch1["model"][k], p) for k, p in heads.items())  # trained, not just BN statistics
    assert not all(torch.equal(epoch2["model"][encoder + k], v) for k, v in weights.items())


@pytest.mark.parametrize("method, flags, expected", [
    ("simclr", ["--freeze-encoder-epochs", "1", "--epochs", "2"],
     "--freeze-encoder-epochs 1 needs --init: a random encoder has no features to protect"),
    ("dino", ["--freeze-encoder-epochs", "2", "--epochs", "2", "--init", "x.pth"],
     "--freeze-encoder-epochs 2 >= --epochs 2: the encoder would never train")], ids=["no-init", "not-below-epochs"])
def test_freeze_encoder_epochs_refusals_are_one_line(method, flags, expected, tmp_path):
    result = run_script(f"{method}.py", "--data", "shapes:32:16:8", *TINY_VIT[:4], *flags,
                        "--output-dir", str(tmp_path))
    assert result.returncode == 1 and error_line(result) == f"{method}.py: error: {expected}"


# ----------------------------------------------------------------------------- domain switches
def both_paths(view, image, n=64):
    """n views of one uint8 (3, H, W) image from the device path (augment_batch) and the DataLoader path."""
    torch.manual_seed(0)
    device = device_views.augment_batch(image.expand(n, -1, -1, -1), view)
    loader = torch.stack([view(Image.fromarray(image.permute(1, 2, 0).numpy())) for _ in range(n)])
    return device, loader


def views_of(*flags, method="simclr"):
    module, args = parse(method, "--data", "shapes:32", "--image-size", "16", *flags)
    return module.augmentations(args).transforms


def test_every_method_documents_and_applies_the_switches():
    for method in METHODS:
        module = importlib.import_module(method)
        text = module.get_args_parser().format_help()
        assert all(flag in text for flag in ("--init", "--freeze-encoder-epochs", "--no-flip", "--no-color", "--vflip",
                                             "--rot90", "--mean", "--grayscale-input", "--std", "--val",
                                             "--skip-bad-images")), method
        views = views_of("--no-flip", "--no-color", "--vflip", "--rot90", "--grayscale-input", "--mean", "0.5", "0.5",
                         "0.5", "--std", "1", "1", "1", method=method)
        assert all(v.flip == 0 and v.jitter_prob == 0 and v.grayscale_prob == 0 and v.solarize == 0 and v.vflip
                   and v.rot90 and v.grayscale_input and v.mean == (0.5, 0.5, 0.5) for v in views), method
        assert not any(v.vflip or v.rot90 for v in views_of(method=method))  # the recipe stays the default
    assert [v.scale for v in views_of("--crop-scale", "0.5", "1")] == [(0.5, 1.0)] * 2
    assert [v.scale for v in views_of(method="simsiam")] == [(0.2, 1.0)] * 2  # the recipe stays the default


def test_no_flip_keeps_an_asymmetric_image_unmirrored():
    image = torch.linspace(0, 255, 24).round().to(torch.uint8).expand(3, 24, 24).contiguous()  # dark left, bright right
    brighter_right = lambda x: (x[..., 8:].mean((1, 2, 3)) > x[..., :8].mean((1, 2, 3))).float().mean()  # noqa: E731
    # crops and blur keep the order: never mirrored
    for views in both_paths(views_of("--no-flip", "--no-color")[0], image):
        assert brighter_right(views) == 1.0
    for views in both_paths(views_of("--no-color")[0], image):  # a flip reverses it, half the time
        assert 0.3 < brighter_right(views) < 0.7


@pytest.mark.parametrize("flip, vflip, rot90, expected", [
    (0.5, True, True, {(k, mirrored) for k in range(4) for mirrored in (False, True)}),  # all eight symmetries
    (0.0, False, True, {(k, False) for k in range(4)}),  # quarter turns alone: never a mirror image
    (0.0, True, False, {(0, False), (2, True)})])  # a vertical flip is a half turn of the mirror image
def test_vflip_and_rot90_give_each_symmetry_as_often(flip, vflip, rot90, expected):
    """Red brightens to the right, green downwards: each of the square's 8 symmetries is another image."""
    ramp = torch.linspace(0, 255, 16).round().to(torch.uint8)
    image = torch.stack([ramp.expand(16, 16), ramp[:, None].expand(16, 16), ramp.new_full((16, 16), 128)])
    view = common.View(16, scale=(1.0, 1.0), jitter_prob=0.0, grayscale_prob=0.0, blur=0.0, flip=flip, vflip=vflip,
                       rot90=rot90)  # a full crop: the image itself, turned or mirrored
    mean, std = torch.tensor(common.IMAGENET_MEAN)[:, None, None], torch.tensor(common.IMAGENET_STD)[:, None, None]
    pixels = (image / 255 - mean) / std
    symmetries = {(k, mirrored): (pixels.flip(-1) if mirrored else pixels).rot90(k, (1, 2))
                  for k in range(4) for mirrored in (False, True)}
    for views in both_paths(view, image, n=800):
        distance = torch.stack([(views - s).abs().flatten(1).amax(1) for s in symmetries.values()], 1)  # (n, 8)
        assert (distance.min(1)[0] < 1e-4).all()  # every view is one of them
        counts = dict(zip(symmetries, distance.argmin(1).bincount(minlength=8).tolist()))
        assert {key for key, count in counts.items() if count} == expected
        assert all(abs(counts[key] - 800 / len(expected)) < 0.2 * 800 / len(expected) for key in expected), counts


def test_no_color_and_mean_std_leave_a_flat_colour_as_it_is():
    image = torch.tensor([200, 60, 120], dtype=torch.uint8)[:, None, None].expand(3, 20, 20).contiguous()
    view = views_of("--no-color", "--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.25", "0.5")[0]
    expected = ((torch.tensor([200, 60, 120]) / 255 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.5]))
    for views in both_paths(view, image):  # crop, flip and blur cannot change a flat colour: nothing else ran
        torch.testing.assert_close(views, expected[None, :, None, None].expand_as(views), atol=2e-3, rtol=0)
    device, loader = both_paths(views_of("--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.25", "0.5")[0], image)
    for views in (device, loader):  # with colour on, most views change colour
        assert ((views - expected[None, :, None, None]).abs().amax((1, 2, 3)) > 0.05).float().mean() > 0.5


def test_grayscale_input_gives_three_equal_channels():
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    view = views_of("--grayscale-input")[0]
    mean, std = torch.tensor(common.IMAGENET_MEAN)[:, None, None], torch.tensor(common.IMAGENET_STD)[:, None, None]
    for views in both_paths(view, image):
        pixels = views * std + mean  # the channels differ only by the normalisation
        torch.testing.assert_close(pixels[:, 1:], pixels[:, :1].expand(-1, 2, -1, -1), atol=1e-5, rtol=0)
    assert not torch.equal(image[0], image[1])
    transform = common.eval_transform(16, grayscale_input=True)
    pixels = transform(Image.fromarray(image.permute(1, 2, 0).numpy())) * std + mean
    torch.testing.assert_close(pixels[1:], pixels[:1].expand(2, -1, -1), atol=1e-5, rtol=0)


def test_bad_mean_or_crop_scale_is_one_line(tmp_path):
    for flags, expected in ((["--grayscale-input", "--mean", "0.5", "0.5"], "expected 1 or 3 values"),
                            (["--std", "0", "1", "1"], "std > 0"),
                            (["--crop-scale", "0.5", "2"], "--crop-scale 0.5 2.0"),
                            (["--val", str(tmp_path / "nope")], "--val .*: no such folder")):
        module, args = parse("simclr", "--data", "shapes:16", *TINY_VIT, "--output-dir", str(tmp_path), *flags)
        with pytest.raises(common.UserError, match=expected):
            module.main(args)


def test_probe_normalises_as_the_run_did(tmp_path):
    import probe
    from weights import load_encoder
    state = {"method": "simclr", "encoder_config": dict(arch="vit_nano", image_size=16, patch_size=8),
             "encoder": common.build_encoder("vit_nano", 16, 8).state_dict(),
             "args": {"mean": [0.5] * 3, "std": [0.2] * 3, "grayscale_input": True}}
    torch.save(state, tmp_path / "c.pth")
    args = probe.get_args_parser().parse_args([str(tmp_path / "c.pth"), "--data", "shapes"])
    load_encoder(args)
    assert (args.mean, args.std, args.grayscale_input) == ([0.5] * 3, [0.2] * 3, True)
    del state["args"]  # a run from before these flags, or a plain state_dict: ImageNet's
    torch.save(state, tmp_path / "c.pth")
    args = probe.get_args_parser().parse_args([str(tmp_path / "c.pth"), "--data", "shapes", "--std", "1", "1", "1"])
    load_encoder(args)
    assert (args.mean, args.std, args.grayscale_input) == (common.IMAGENET_MEAN, [1.0] * 3, False)



def test_probe_trains_on_the_run_s_views(tmp_path):
    """Linear --augment and fine-tuning keep out what the run kept out (a mirror image, a colour change) and turn
    the images as it did; probe.py's flags override."""
    import probe
    from weights import load_encoder
    from torchvision.transforms import v2
    state = {"method": "simclr", "encoder_config": dict(arch="vit_nano", image_size=16, patch_size=8),
             "encoder": common.build_encoder("vit_nano", 16, 8).state_dict(),
             "args": {"no_flip": True, "no_color": True, "vflip": True}}
    torch.save(state, tmp_path / "c.pth")

    def views(*flags):  # the fine-tuning views (linear --augment's are the same without RandAugment and erasing)
        args = probe.get_args_parser().parse_args([str(tmp_path / "c.pth"), "--data", "shapes", *flags])
        load_encoder(args)
        transform = probe.train_augmentation(16, args, rand_augment=True)
        assert transform(shapes.Shapes("train", 16, 1)[0][0]).shape == (3, 16, 16)
        kinds = [type(t) for t in transform.transforms]
        return kinds, next(t for t in transform.transforms if isinstance(t, v2.RandAugment))

    kinds, rand_augment = views()
    assert v2.RandomHorizontalFlip not in kinds and v2.RandomVerticalFlip in kinds and v2.RandomChoice not in kinds
    assert set(rand_augment._AUGMENTATION_SPACE) == {"Identity", "ShearX", "ShearY", "TranslateX", "TranslateY",
                                                     "Rotate", "Sharpness"}  # no colour or intensity op
    kinds, rand_augment = views("--flip", "--color", "--no-vflip", "--rot90")
    assert v2.RandomHorizontalFlip in kinds and v2.RandomVerticalFlip not in kinds and v2.RandomChoice in kinds
    assert type(rand_augment) is v2.RandAugment
    del state["args"]  # a run from before these flags: the flip and the colour ops, no vertical flip or turn
    torch.save(state, tmp_path / "c.pth")
    kinds, rand_augment = views()
    assert (v2.RandomHorizontalFlip in kinds and v2.RandomVerticalFlip not in kinds and v2.RandomChoice not in kinds
            and type(rand_augment) is v2.RandAugment)


@pytest.mark.parametrize("cpu_augment", [False, True])
def test_a_run_turns_its_views_and_probe_reads_it(tmp_path, cpu_augment):
    import probe
    from weights import load_encoder
    flags = ["--data", "shapes:16:16:8", *TINY_VIT, *HEADS["simclr"].split(), "--no-flip", "--vflip", "--rot90",
             *(["--cpu-augment"] if cpu_augment else []), "--output-dir", str(tmp_path)]
    result = run_script("simclr.py", *flags)
    assert result.returncode == 0, result.stderr
    assert ("held and augmented on cpu" in result.stdout) != cpu_augment  # the device path, or torchvision's
    args = probe.get_args_parser().parse_args([str(tmp_path / "checkpoint.pth"), "--data", "shapes:16:16:8"])
    load_encoder(args)
    assert (args.flip, args.color, args.vflip, args.rot90) == (False, True, True, True)

# ----------------------------------------------------------------------------- unlabelled folders
def write_images(folder, count, start=0, ext="png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        shapes.Shapes(image_size=16).__getitem__(i)[0].save(folder / f"{i}.{ext}")


def test_flat_and_nested_folders_are_unlabelled(tmp_path):
    write_images(tmp_path / "flat", 3)
    write_images(tmp_path / "flat", 2, 3, "jpg")
    write_images(tmp_path / "nested" / "2024" / "05", 2)
    write_images(tmp_path / "nested" / "2025" / "01", 3)
    write_images(tmp_path / "labelled" / "cat", 2)
    write_images(tmp_path / "labelled" / "dog", 2)
    for name, size in (("flat", 5), ("nested", 5)):
        dataset = common.build_dataset(str(tmp_path / name), "pretrain")
        assert len(dataset) == size and {dataset[i][1] for i in range(size)} == {0}, name
    assert common.build_dataset(str(tmp_path / "labelled"), "pretrain").classes == ["cat", "dog"]


def test_unlabelled_folder_trains_with_val_for_the_knn_monitor(tmp_path):
    write_images(tmp_path / "dump", 16)
    flags = ["--data", str(tmp_path / "dump"), "--image-size", "16", *TINY_VIT[:-4], "--knn-every", "1",
             "--workers", "0"]
    result = run_script("simclr.py", *flags, "--output-dir", str(tmp_path / "a"), threads=1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("k-NN monitor off") == 1 and "--val" in result.stdout  # said once, at start
    result = run_script("simclr.py", *flags, "--val", "shapes:16:32:16", "--output-dir", str(tmp_path / "b"), threads=1)
    assert result.returncode == 0, result.stderr
    assert [r["epoch"] for r in map(json.loads, open(tmp_path / "b" / "log.jsonl")) if "knn_top1" in r] == [0, 1]


@pytest.mark.parametrize("cpu_augment", [False, True])
def test_skip_bad_images_replaces_and_counts(tmp_path, cpu_augment):
    """Device path: a truncated PNG (its header reads, so the folder is held in memory; decoding fails).
    DataLoader path (--cpu-augment, one worker process): a file that is no image at all."""
    write_images(tmp_path / "dump", 15)
    (tmp_path / "dump" / "broken.png").write_bytes((tmp_path / "dump" / "0.png").read_bytes()[:80] if not cpu_augment
                                                   else b"no png")
    flags = ["--data", str(tmp_path / "dump"), "--image-size", "16", *TINY_VIT[:-2],
             "--workers", "1" if cpu_augment else "0", *(["--cpu-augment"] if cpu_augment else [])]
    line = error_line(run_script("simclr.py", *flags, "--output-dir", str(tmp_path / "a"), threads=1))
    assert "cannot read image" in line and "broken.png" in line  # without the flag: one line naming the file
    result = run_script("simclr.py", *flags, "--skip-bad-images", "--output-dir", str(tmp_path / "b"), threads=1)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable images so far" in result.stdout and "broken.png" in result.stdout
    assert ("held and augmented on cpu" in result.stdout) != cpu_augment
    dataset = common.build_dataset(str(tmp_path / "dump"), "pretrain", skip_bad=True)
    broken = [path for path, _ in dataset.samples].index(str(tmp_path / "dump" / "broken.png"))
    assert dataset[broken][0].size == (16, 16) and dataset.bad.sum() == 1  # the next image instead


def test_skip_bad_images_counts_every_rank(tmp_path):
    write_images(tmp_path / "dump", 16)
    for name in "abcd":  # 4 of 20, sorted after the PNGs
        (tmp_path / "dump" / f"{name}.jpg").write_bytes(b"no image")
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "simclr.py",
                        "--data", str(tmp_path / "dump"), "--image-size", "16", *TINY_VIT[:-5], "2", "--knn-every", "0",
                        "--workers", "0", "--skip-bad-images", "--output-dir", str(tmp_path / "o"), threads=1)
    assert result.returncode == 0, result.stderr[-2000:]
    # a.jpg is drawn (seed 0), and its replacement walks b, c, d to the next readable file: all 4 are marked
    assert "skipped 4 unreadable images so far" in result.stdout


# ----------------------------------------------------------------------------- plots
def test_plot_logs_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "log.jsonl").write_text('{"epoch": 0, "knn_top1": 0.3}\n'
                                        '{"epoch": 1, "loss": 2.0, "lr": 0.1, "knn_top1": 0.4}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.syspath_prepend(ROOT + "/benchmarks")
    plot_logs = importlib.import_module("plot_logs")
    assert [r["epoch"] for r in plot_logs.read_log(tmp_path / "log.jsonl")] == [0, 1]
    with pytest.raises(SystemExit) as exit_:
        plot_logs.main([str(tmp_path / "log.jsonl"), "--output", str(tmp_path / "c.png")])
    assert exit_.value.code == "plot_logs.py: error: matplotlib is not installed (pip install matplotlib)"


def test_plot_logs_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    for run, key in (("simclr", "embedding_std"), ("dino", "teacher_entropy")):
        (tmp_path / run).mkdir()
        (tmp_path / run / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 1 / e, "lr": 0.1, key: 0.5})
                                                          + "\n" for e in (1, 2)))
    result = run_script("benchmarks/plot_logs.py", str(tmp_path / "simclr" / "log.jsonl"),
                        str(tmp_path / "dino" / "log.jsonl"), "--output", str(tmp_path / "c.png"))
    assert result.returncode == 0, result.stderr
    assert "loss, lr, embedding_std, teacher_entropy" in result.stdout
    assert torchvision.io.read_image(str(tmp_path / "c.png")).shape[0] in (3, 4)
