"""Public ViT layouts (issue 25, items 1-2): DINOv2's hub files (with and without registers), timm's *_reg4_dinov2,
DeiT III and augreg files and Hugging Face's Dinov2Model / ViTMAEModel state_dicts load through probe.py and --init
with no layout flag, and give the features of a reference forward written here from the published formula (timm is
not needed); a malformed file is one error line."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import dino
import probe
import weights
from test_practitioner import HEADS as HEAD_FLAGS, METHODS, TINY_VIT, parse, targets

D, DEPTH, HEADS, PATCH = 128, 4, 4, 14  # vit_nano at patch 14: 28 px images are a 2 x 2 grid

LAYOUTS = {  # name: (LayerScale, registers, its key for them, a CLS slot in pos_embed, extra keys the loader drops)
    "dinov2": (True, 0, "register_tokens", True, {"mask_token": torch.zeros(1, D)}),  # dinov2_vits14_pretrain.pth
    "dinov2_reg4": (True, 4, "register_tokens", True, {"mask_token": torch.zeros(1, D)}),  # *_reg4_pretrain.pth
    "timm_reg4_dinov2": (True, 4, "reg_token", False, {}),  # timm's vit_small_patch14_reg4_dinov2: no_embed_class
    "deit3": (True, 0, "reg_token", False, {"head.weight": torch.zeros(10, D), "head.bias": torch.zeros(10)}),
    "augreg": (False, 0, "reg_token", True, {"head.weight": torch.zeros(10, D), "head.bias": torch.zeros(10)}),
}


def layout_file(name, grid=2, seed=0):
    """A state_dict with the layout's own key names and shapes; random weights, LayerScale gammas away from 1."""
    layer_scale, registers, register_key, cls_slot, extra = LAYOUTS[name]
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=0.1, mean=0.0: mean + scale * torch.randn(*shape, generator=g)
    state = {"cls_token": rand(1, 1, D, scale=1.0), "pos_embed": rand(1, cls_slot + grid * grid, D, scale=1.0),
             "patch_embed.proj.weight": rand(D, 3, PATCH, PATCH, scale=0.02), "patch_embed.proj.bias": rand(D),
             "norm.weight": rand(D, mean=1.0), "norm.bias": rand(D), **extra}
    if registers:
        state[register_key] = rand(1, registers, D, scale=1.0)
    for i in range(DEPTH):
        for key, shape in (("norm1", (D,)), ("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)), ("norm2", (D,)),
                           ("mlp.fc1", (4 * D, D)), ("mlp.fc2", (D, 4 * D))):
            state[f"blocks.{i}.{key}.weight"] = rand(*shape, mean=1.0 if key.startswith("norm") else 0.0)
            state[f"blocks.{i}.{key}.bias"] = rand(shape[0])
        if layer_scale:
            state[f"blocks.{i}.ls1.gamma"], state[f"blocks.{i}.ls2.gamma"] = rand(D, mean=0.5), rand(D, mean=1.5)
    return state


def reference_features(state, images):
    """The published forward: patch conv; DINOv2 / DINO add pos_embed to [CLS, patches], timm's no_embed_class to the
    patches alone; registers go in after CLS with no position; pre-norm blocks x + γ·f(norm(x)); final norm; CLS.
    pos_embed is resized as each family's code does: DINOv2-reg and timm antialias to size=, DINOv2 scales by
    (g + 0.1)/n."""
    B, grid = images.shape[0], images.shape[-1] // PATCH
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)  # (B, L, D)
    registers = state.get("register_tokens", state.get("reg_token"))
    pos = state["pos_embed"]
    slot = int(math.isqrt(pos.shape[1]) ** 2 != pos.shape[1])
    n = math.isqrt(pos.shape[1] - slot)
    if n != grid:
        patch_pos = pos[:, slot:].reshape(1, n, n, D).permute(0, 3, 1, 2)
        if registers is not None or not slot:
            patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", antialias=True)
        else:
            patch_pos = F.interpolate(patch_pos, scale_factor=((grid + 0.1) / n,) * 2, mode="bicubic")
        pos = torch.cat([pos[:, :slot], patch_pos.flatten(2).transpose(1, 2)], dim=1)
    cls = state["cls_token"].expand(B, -1, -1)
    x = torch.cat([cls, x], dim=1) + pos if slot else torch.cat([cls, x + pos], dim=1)  # (B, 1 + L, D)
    if registers is not None:
        x = torch.cat([x[:, :1], registers.expand(B, -1, -1), x[:, 1:]], dim=1)  # (B, 1 + R + L, D)
    norm = lambda x, key: F.layer_norm(x, (D,), state[f"{key}.weight"], state[f"{key}.bias"], eps=1e-6)
    linear = lambda x, key: F.linear(x, state[f"{key}.weight"], state[f"{key}.bias"])
    for i in range(DEPTH):
        gamma1, gamma2 = (state.get(f"blocks.{i}.{ls}.gamma", 1.0) for ls in ("ls1", "ls2"))
        q, k, v = linear(norm(x, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv").reshape(
            B, x.shape[1], 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
        attention = (q @ k.transpose(-2, -1) * (D // HEADS) ** -0.5).softmax(-1) @ v  # (B, h, N, d)
        x = x + gamma1 * linear(attention.transpose(1, 2).reshape(B, -1, D), f"blocks.{i}.attn.proj")
        hidden = F.gelu(linear(norm(x, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1"))
        x = x + gamma2 * linear(hidden, f"blocks.{i}.mlp.fc2")
    return norm(x, "norm")[:, 0]


def probe_encoder(path, *flags):
    args = probe.get_args_parser().parse_args([str(path), "--data", "shapes:28", "--arch", "vit_nano",
                                               "--patch-size", str(PATCH), "--image-size", "28", *flags])
    return weights.load_encoder(args)[0].eval()


def init_encoder(path, tmp_path):
    """--init as every method reads it: build_model calls common.load_encoder_weights (test_practitioner: all six)."""
    module, args = parse("simclr", "--data", "shapes:28", *TINY_VIT, "--patch-size", str(PATCH), "--image-size", "28",
                         "--init", str(path), "--output-dir", str(tmp_path / "init"))
    return module.build_model(args).encoder.eval()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grid", [2, 3])  # the file's own grid, and one that must be resized to our 2 x 2
def test_layout_loads_through_probe_and_init_and_equals_the_reference(layout, grid, tmp_path):
    state = layout_file(layout, grid)
    torch.save({"model": state} if layout.startswith("dinov2") else state, tmp_path / "file.pth")
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    expected = reference_features(state, images)
    for encoder in (probe_encoder(tmp_path / "file.pth"), init_encoder(tmp_path / "file.pth", tmp_path)):
        assert encoder.num_prefix_tokens == 1 + LAYOUTS[layout][1]
        with torch.no_grad():
            torch.testing.assert_close(encoder(images), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_every_methods_init_gives_its_encoder_and_targets_the_files_layout(method, tmp_path):
    """Each method builds its encoder plain; --init gives it the file's LayerScale and registers before the EMA
    copies (BYOL's target, MoCo's momentum encoder) are made and DINO builds its teacher. MAE: no registers."""
    state = layout_file("dinov2" if method == "mae" else "dinov2_reg4")
    torch.save({"model": state}, tmp_path / "file.pth")
    module, args = parse(method, "--data", "shapes:28", *TINY_VIT, "--patch-size", str(PATCH), "--image-size", "28",
                         *HEAD_FLAGS[method].split(), "--init", str(tmp_path / "file.pth"),
                         "--output-dir", str(tmp_path))
    encoder, copies = targets(method, module.build_model(args))
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for network in (encoder, *copies):
            torch.testing.assert_close(network.eval()(images), reference_features(state, images), atol=1e-5, rtol=1e-5)


def test_the_layout_travels_in_the_checkpoint_and_every_readout_skips_the_registers(tmp_path):
    """simclr --init of a DINOv2-reg file at lr 0: the checkpoint's encoder_config rebuilds it in probe.py with no
    flag, with the file's features; the mean-pooled readouts average the patch tokens only."""
    state = layout_file("dinov2_reg4")
    torch.save(state, tmp_path / "reg4.pth")
    module, args = parse("simclr", "--data", "shapes:28:32:16", *TINY_VIT, "--patch-size", str(PATCH), "--image-size",
                         "28", "--base-lr", "0", "--proj-hidden", "32", "--proj-dim", "16", "--init",
                         str(tmp_path / "reg4.pth"), "--output-dir", str(tmp_path / "run"))
    module.main(args)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)
    assert checkpoint["encoder_config"] == dict(arch="vit_nano", image_size=28, patch_size=PATCH, layer_scale=True,
                                                registers=4)
    encoder = weights.load_encoder(probe.get_args_parser().parse_args([str(tmp_path / "run" / "checkpoint.pth"),
                                                                     "--data", "shapes:28"]))[0].eval()
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), reference_features(state, images), atol=1e-5, rtol=1e-5)
        tokens = encoder.forward_tokens(encoder.embed(images))  # (B, 1 + 4 + 4, D)
        readout = weights.Readout(encoder, n_last_blocks=1, avgpool=True)(images)  # (B, 2D): CLS, mean of patches
        torch.testing.assert_close(readout[:, D:], tokens[:, 5:].mean(1))
        classifier = weights.Classifier(encoder, 3, global_pool=True)  # the final norm dropped: MAE's global pool
        tokens = encoder.forward_tokens(encoder.embed(images))
        torch.testing.assert_close(classifier(images), classifier.head(tokens[:, 5:].mean(1)))
    # A resume takes the layout from its checkpoint, without reading --init again.
    (tmp_path / "reg4.pth").unlink()
    module.main(parse("simclr", *[str(a) for a in ["--data", "shapes:28:32:16", *TINY_VIT[:TINY_VIT.index("--epochs")],
                                                   "--epochs", "2", *TINY_VIT[TINY_VIT.index("--epochs") + 2:],
                                                   "--patch-size", PATCH, "--image-size", 28, "--base-lr", 0,
                                                   "--proj-hidden", 32, "--proj-dim", 16, "--init",
                                                   tmp_path / "reg4.pth", "--output-dir", tmp_path / "run"]])[1])
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)["epoch"] == 2


def hugging_face_file(state, model):
    """The state in Hugging Face's names, written from its modeling_dinov2.py / modeling_vit_mae.py: query, key, value
    apart; the task model's prefix and heads around it (Dinov2ForImageClassification, ViTMAEForPreTraining)."""
    mae = model == "vit_mae"
    top = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "register_tokens": "embeddings.register_tokens", "mask_token": "embeddings.mask_token",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    block = {"norm1": "layernorm_before" if mae else "norm1", "attn.proj": "attention.output.dense",
             "norm2": "layernorm_after" if mae else "norm2", "mlp.fc1": "intermediate.dense" if mae else "mlp.fc1",
             "mlp.fc2": "output.dense" if mae else "mlp.fc2", "ls1": "layer_scale1", "ls2": "layer_scale2"}
    hf = {}
    for key, value in state.items():
        if not key.startswith("blocks."):
            hf.update({top[key]: value} if key in top else {})  # timm's head: the task model has its own
            continue
        _, i, rest = key.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        if module == "attn.qkv":
            for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                hf[f"encoder.layer.{i}.attention.attention.{part}.{kind}"] = chunk
        else:
            hf[f"encoder.layer.{i}.{block[module]}.{'lambda1' if kind == 'gamma' else kind}"] = value
    prefix, heads = ("vit.", {"decoder.decoder_embed.weight": torch.zeros(32, D)}) if mae else (
        "dinov2.", {"classifier.weight": torch.zeros(10, 2 * D)})
    return {**{prefix + k: v for k, v in hf.items()}, **heads}


@pytest.mark.parametrize("layout, model", [("dinov2", "dinov2"), ("dinov2_reg4", "dinov2"), ("augreg", "vit_mae")])
def test_hugging_face_state_dicts_load_and_equal_the_reference(layout, model, tmp_path):
    state = layout_file(layout, grid=3)
    torch.save(hugging_face_file(state, model), tmp_path / "hf.pth")
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    for encoder in (probe_encoder(tmp_path / "hf.pth"), init_encoder(tmp_path / "hf.pth", tmp_path)):
        with torch.no_grad():
            torch.testing.assert_close(encoder(images), reference_features(state, images), atol=1e-5, rtol=1e-5)


def test_dino_attention_maps_skip_the_registers():
    encoder = common.build_encoder("vit_nano", 28, PATCH, layer_scale=True, registers=4).eval()
    assert dino.cls_attention(encoder, torch.randn(2, 3, 28, 28)).shape == (2, HEADS, 4)  # the 2 x 2 patches only


def test_mae_refuses_a_file_with_registers(tmp_path):
    torch.save(layout_file("dinov2_reg4"), tmp_path / "reg4.pth")
    module, args = parse("mae", "--data", "shapes:28", *TINY_VIT, "--patch-size", str(PATCH), "--image-size", "28",
                         "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "4",
                         "--init", str(tmp_path / "reg4.pth"), "--output-dir", str(tmp_path / "o"))
    with pytest.raises(common.UserError, match="MAE keeps no register tokens") as error:
        module.build_model(args)
    assert "\n" not in str(error.value)


def malformed(kind):
    state = layout_file("dinov2")
    if kind == "non-tensors":
        return {"model": {"a": 1, "b": "text"}}
    if kind == "vit-g":  # DINOv2's ViT-g/14: SwiGLU MLP
        state["blocks.0.mlp.w12.weight"] = torch.zeros(2 * D, D)
    if kind == "vit-g hf":  # the same in Hugging Face's names
        return {**hugging_face_file(state, "dinov2"), "dinov2.encoder.layer.0.mlp.weights_in.weight": torch.zeros(D, D)}
    if kind == "patch 16":
        state["patch_embed.proj.weight"] = torch.zeros(D, 3, 16, 16)
    if kind == "pos_embed":  # timm's reg_token with no_embed_class=False: slots for the registers too
        state["pos_embed"] = torch.zeros(1, 1 + 4 + 3 * 3, D)
    return state


@pytest.mark.parametrize("kind, expected", [
    ("non-tensors", "holds no state_dict of tensors"),
    ("vit-g", "blocks.0.mlp.w12.weight is ViT-g's SwiGLU MLP"),
    ("vit-g hf", "blocks.0.mlp.weights_in.weight is ViT-g's SwiGLU MLP"),
    ("patch 16", "patch_embed.proj.weight is [128, 3, 16, 16] in the file, [128, 3, 14, 14] here"),
    ("pos_embed", "pos_embed is [1, 14, 128], not (1, [1 +] g*g, D)")])
def test_a_malformed_file_is_one_line_in_probe_and_init(kind, expected, tmp_path):
    torch.save(malformed(kind), tmp_path / "bad.pth")
    for load in (lambda: probe_encoder(tmp_path / "bad.pth"), lambda: init_encoder(tmp_path / "bad.pth", tmp_path)):
        with pytest.raises(common.UserError) as error:
            load()
        assert expected in str(error.value) and "\n" not in str(error.value)


def test_probes_arch_path_takes_num_heads_and_its_baselines_the_files_architecture(tmp_path):
    torch.save(layout_file("augreg"), tmp_path / "vit.pth")
    assert probe_encoder(tmp_path / "vit.pth", "--num-heads", "8").blocks[0].attn.num_heads == 8
    torch.save(layout_file("dinov2_reg4"), tmp_path / "reg4.pth")
    args = probe.get_args_parser().parse_args([str(tmp_path / "reg4.pth"), "--data", "shapes:28", "--arch", "vit_nano",
                                               "--patch-size", str(PATCH), "--image-size", "28"])
    random = weights.load_encoder(args, random_init=True)[0]  # --baselines: the same architecture, not the weights
    assert random.num_prefix_tokens == 5 and isinstance(random.blocks[0].ls1, common.LayerScale)
    assert not torch.equal(random.cls_token, layout_file("dinov2_reg4")["cls_token"])
