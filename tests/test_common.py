"""The shared pieces: dataset, augmentations, backbones, schedules, optimiser, gather, checkpoints."""
import argparse
import math
import sys

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms import v2

import common
import shapes
from helpers import run_script


def test_shapes_is_deterministic_labelled_and_split():
    train, val = shapes.Shapes("train", 32, 50), shapes.Shapes("val", 32, 10)
    a, b = train[7], shapes.Shapes("train", 32, 50)[7]
    assert np.array_equal(np.array(a[0]), np.array(b[0])) and a[1] == b[1]
    assert a[0].size == (32, 32) and a[0].mode == "RGB"
    assert not np.array_equal(np.array(train[0][0]), np.array(val[0][0]))
    labels = [train[i][1] for i in range(50)]
    assert len(set(labels)) >= 8  # every class appears in a small sample
    assert common.build_dataset("shapes:64:100", "val")[0][0].size == (64, 64)
    assert len(common.build_dataset("shapes:64:100", "val")) == 20


def test_two_views_shapes():
    image = shapes.Shapes("train", 32, 1)[0][0]
    views = common.MultiView([common.View(32)] * 2)(image)
    assert [v.shape for v in views] == [(3, 32, 32)] * 2 and views[0].dtype == torch.float32
    assert not torch.equal(views[0], views[1])
    assert common.eval_transform(224)(image.resize((300, 260))).shape == (3, 224, 224)


def test_resnet_stem_follows_image_size_and_loads_into_torchvision():
    small, large = common.build_encoder("resnet18", 32), common.build_encoder("resnet18", 224)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and small.embed_dim == 512
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    reference = torchvision.models.resnet18()
    reference.fc = torch.nn.Identity()  # the encoder is saved without its classifier
    reference.load_state_dict(large.state_dict(), strict=True)


def test_vit_uses_timm_names_and_runs_on_token_subsets():
    vit = common.build_encoder("vit_nano", image_size=32, patch_size=8)
    names = set(vit.state_dict())
    block = {f"blocks.0.{n}.{p}" for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for p in ("weight", "bias")}
    assert block <= names and {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "norm.bias"} <= names
    assert len(names) == 2 + 2 + 2 + 4 * 12  # patch_embed, cls + pos, norm, 4 blocks of 12
    assert vit.pos_embed.shape == (1, 1 + 4 * 4, 128)  # CLS + a 4x4 grid of 8 px patches
    x = torch.randn(2, 3, 32, 32)
    assert vit(x).shape == (2, 128)
    tokens = vit.embed(x)  # (2, 16, 128)
    assert vit.forward_tokens(tokens[:, :4]).shape == (2, 5, 128)
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 128)  # position embedding interpolated
    vit.eval()  # the fused attention kernel computes softmax(q kᵀ / √d) v, per head
    block = vit.blocks[0]
    q, k, v = block.attn.qkv(tokens).reshape(2, 16, 3, 4, 32).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
    explicit = (q @ k.transpose(-2, -1) / 32 ** 0.5).softmax(-1) @ v  # (B, h, N, d)
    expected = block.attn.proj(explicit.transpose(1, 2).reshape(2, 16, 128))
    torch.testing.assert_close(block.attn(tokens), expected, atol=1e-5, rtol=1e-5)
    fixed = common.build_encoder("vit_nano", 32, 8, sincos=True)
    assert not fixed.pos_embed.requires_grad and fixed.pos_embed[0, 0].abs().sum() == 0


def test_cosine_schedule():
    f = lambda s: common.cosine_schedule(s, 100, 1.0, 0.1, warmup_steps=10)
    assert f(0) == 0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    momentum = lambda s: common.cosine_schedule(s, 100, 0.996, 1.0)  # BYOL / DINO EMA rises to 1
    assert momentum(0) == 0.996 and momentum(100) == 1.0
    assert momentum(30) == pytest.approx(1 - 0.004 * (math.cos(math.pi * 0.3) + 1) / 2)


def test_lars_adapts_weights_but_not_biases_or_norms():
    layer, norm = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)
    model = torch.nn.Sequential(layer, norm)
    groups = common.param_groups(model, weight_decay=0.1)
    assert {id(p) for p in groups[0]["params"]} == {id(layer.weight)}
    optimizer = common.LARS(groups, lr=1.0, momentum=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    w = before["0.weight"]
    update = torch.ones_like(w) + 0.1 * w  # g + λw, then scaled to η‖w‖/‖g + λw‖
    expected = w - 0.001 * w.norm() / update.norm() * update
    torch.testing.assert_close(layer.weight.detach(), expected)
    torch.testing.assert_close(layer.bias.detach(), before["0.bias"] - 1.0)  # plain SGD, no decay
    torch.testing.assert_close(norm.weight.detach(), before["1.weight"] - 1.0)


def test_all_gather_alone_is_identity_and_respects_keep_grad():
    x = torch.randn(3, 2, requires_grad=True)
    assert common.all_gather(x, keep_grad=True) is x
    assert not common.all_gather(x, keep_grad=False).requires_grad


def test_sync_batchnorm_equals_batchnorm_on_the_global_batch_without_a_host_read():
    """2 gloo ranks (tests/sync_bn_step.py): outputs, gradients and running statistics of BatchNorm on the global
    batch, and no op whose result the host must read from the device (torch's own layer has one in every forward)."""
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/sync_bn_step.py")
    assert result.returncode == 0, result.stderr


def test_effective_rank_counts_the_directions_the_embeddings_use():
    torch.manual_seed(0)
    assert common.effective_rank(torch.randn(1024, 64)) > 60  # isotropic: nearly all 64
    assert common.effective_rank(torch.randn(1024, 8) @ torch.randn(8, 64)) == pytest.approx(8, rel=0.15)
    assert common.effective_rank(torch.randn(1024, 1) @ torch.randn(1, 64)) == pytest.approx(1, abs=0.01)  # collapsed
    assert common.effective_rank(torch.randn(16, 64)) < 16  # at most the batch


def test_embedding_std_separates_spread_from_collapse():
    d = 64
    spread = common.embedding_std(torch.randn(4096, d))
    assert spread == pytest.approx(1 / math.sqrt(d), rel=0.05)
    assert common.embedding_std(torch.ones(256, d) + 1e-4 * torch.randn(256, d)) < 0.01


def test_knn_classify_votes_with_exp_similarity():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    query = torch.tensor([[0.0, 2.0]])
    scores = common.knn_classify(train, labels, query, k=2, temperature=0.5, num_classes=2)
    s = torch.nn.functional.normalize(train, dim=1) @ torch.tensor([0.0, 1.0])
    torch.testing.assert_close(scores, torch.tensor([[torch.exp(s[1] / 0.5), torch.exp(s[2] / 0.5)]]))


def test_checkpoint_round_trip_and_kind_check(tmp_path):
    path = str(tmp_path / "c.pth")
    common.save_checkpoint({"method": "simclr", "encoder_config": {"arch": "resnet18"}, "encoder": {}}, path)
    assert common.load_checkpoint(path, "simclr")["encoder_config"]["arch"] == "resnet18"
    with pytest.raises(common.UserError, match="not byol"):
        common.load_checkpoint(path, "byol")
    assert not (tmp_path / "c.pth.tmp").exists()


def test_lars_momentum_over_steps_equals_per_tensor_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3))
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: torch.zeros_like(p) for n, p in reference.items()}
    optimizer = common.LARS(common.param_groups(model, 0.01), lr=0.5, momentum=0.9)
    for _ in range(3):
        grads = {n: torch.randn_like(p) for n, p in reference.items()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        optimizer.step()
        # u = g + λw scaled by η‖w‖/‖u‖ (matrices only); v = m·v + u; w -= lr·v
        for n, w in reference.items():
            u = grads[n] + (0.01 * w if w.ndim > 1 else 0)
            if w.ndim > 1:
                u = u * 0.001 * w.norm() / u.norm()
            buffers[n] = 0.9 * buffers[n] + u
            reference[n] = w - 0.5 * buffers[n]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[n], msg=lambda m: f"{n}: {m}")


def test_eval_transform_is_bicubic_and_features_are_fp32(monkeypatch):
    """DINO's eval_knn.py and MAE's eval transform resize bicubically, and DINO extracts k-NN features in
    fp32: nothing in extract_features may enter autocast (bf16 would round near-equal cosines)."""
    resize = [t for t in common.eval_transform(224).transforms if isinstance(t, v2.Resize)][0]
    assert resize.interpolation == v2.InterpolationMode.BICUBIC and resize.size == [256]
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: (_ for _ in ()).throw(AssertionError("autocast entered")))
    dataset = shapes.Shapes("val", 16, 8, transform=common.eval_transform(16))
    loader = common.make_loader(dataset, 4, common.DistEnv(), 0, train=False)
    features, labels = common.extract_features(common.build_encoder("vit_nano", 16, 8), loader, common.DistEnv())
    assert features.dtype == torch.float32 and features.shape == (8, 128) and labels.shape == (8,)


def test_common_works_without_device_views(monkeypatch, capsys):
    """A method file copied with common.py alone: DataLoader workers make the views, and BN becomes torch's own
    SyncBatchNorm (device_views.py, the speed path, is optional)."""
    monkeypatch.setitem(sys.modules, "device_views", None)  # `import device_views` now fails
    dataset = shapes.Shapes(image_size=16, num_images=64, transform=common.MultiView([common.View(16)]))
    loader = common.make_loader(dataset, 8, common.DistEnv(), 0)
    assert type(loader) is torch.utils.data.DataLoader
    assert "note: no device_views.py" in capsys.readouterr().out
    model = common.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    assert type(model[0]) is torch.nn.SyncBatchNorm
    monkeypatch.undo()
    assert type(common.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))).__module__ == "device_views"


def test_init_without_weights_py_is_one_line(monkeypatch):
    """--init reads the file through weights.py; a method copied with common.py alone says so in one line."""
    monkeypatch.setitem(sys.modules, "weights", None)  # `import weights` now fails
    args = argparse.Namespace(init="dinov2_vits14_pretrain.pth", output_dir="runs/x", resume="")
    with pytest.raises(common.UserError, match="--init needs weights.py beside common.py"):
        common.load_encoder_weights(common.build_encoder("vit_nano", 16, 8), args)


def test_vit_huge_is_mae_s_vit_h14():
    """--arch vit_huge --patch-size 14 is MAE's ViT-H/14: timm's vit_huge_patch14_224.mae has 630,764,800 parameters
    (width 1280, 32 blocks, 16 heads); counted on one block, the 32 would take 2.5 GB."""
    dim, depth, heads = common.VIT_SIZES["vit_huge"]
    one_block = common.VisionTransformer(224, 14, dim, 1, heads, 0.0, False)
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert count(one_block) + (depth - 1) * count(one_block.blocks[0]) == 630_764_800 and heads == 16
