"""SimCLR: the loss is the paper's formula, one DDP step equals one big-batch step, resume is exact,
and a short run learns something a random encoder does not know."""
import math

import torch
import torch.nn.functional as F
import torchvision

import common
import simclr
from helpers import assert_same_state, assert_same_step, ddp_vs_single_process, short_run, straight_and_preempted

# README's quick start: CPU scale (vit_nano, 32 px), 8 epochs of 1500 images, about 2 minutes on 2 cores.
QUICK = ["--data", "shapes:32:1500:2000", "--arch", "vit_nano", "--patch-size", "8", "--epochs", "8", "--batch-size", "64",
         "--base-lr", "4", "--temperature", "0.2", "--warmup-epochs", "1", "--workers", "2"]


def test_info_nce_equals_per_anchor_formula():
    torch.manual_seed(0)
    z1, z2, tau = torch.randn(6, 16), torch.randn(6, 16), 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    losses = []
    for i in range(2 * n):  # l(i, j) = -log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ), written out per anchor
        j = (i + n) % (2 * n)
        denominator = sum(torch.exp(z[i] @ z[k] / tau) for k in range(2 * n) if k != i)
        losses.append(-torch.log(torch.exp(z[i] @ z[j] / tau) / denominator))
    # The official scale (objective.py): loss_a + loss_b, the means over view 1's and view 2's N anchors.
    loss_a, loss_b = torch.stack(losses[:n]).mean(), torch.stack(losses[n:]).mean()
    torch.testing.assert_close(simclr.info_nce(z1, z2, tau), loss_a + loss_b)


def test_official_heads_init_and_views():
    """Official SimCLR: the projector's output BN keeps its scale γ but has no shift β (model_util.py
    linear_layer, center=False); residual blocks start as the identity (resnet.py init_zero); crops are
    resized bicubically (data_util.py)."""
    args = simclr.get_args_parser().parse_args(["--data", "shapes", "--image-size", "32", "--arch", "resnet18",
                                                "--proj-hidden", "64", "--proj-dim", "16"])
    model = simclr.build_model(args)
    out_bn = model.projector[-1]
    assert isinstance(out_bn, torch.nn.BatchNorm1d) and out_bn.weight.requires_grad and not out_bn.bias.requires_grad
    trained = {id(p) for group in common.param_groups(model, 1e-6) for p in group["params"]}
    assert id(out_bn.weight) in trained and id(out_bn.bias) not in trained
    blocks = [m for m in model.encoder.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    assert len(blocks) == 8 and all((block.bn2.weight == 0).all() and (block.bn1.weight == 1).all() for block in blocks)
    assert all(view.interpolation == "bicubic" for view in simclr.augmentations(args).transforms)


def test_info_nce_prefers_aligned_views_and_needs_its_negatives():
    torch.manual_seed(0)
    z = torch.randn(32, 8)
    assert simclr.info_nce(z, z + 0.01 * torch.randn_like(z), 0.1) < simclr.info_nce(z, torch.randn_like(z), 0.1)
    # The same perfectly aligned pairs, spread over the sphere or all at one point: a loss without negatives scores
    # both alike. At one point each anchor's 2N − 1 candidates all score as its positive does: log(2N − 1) per
    # anchor, twice (loss_a + loss_b).
    collapsed = torch.ones(32, 8)
    torch.testing.assert_close(simclr.info_nce(collapsed, collapsed, 0.1), torch.tensor(2 * math.log(63)))
    assert simclr.info_nce(z, z, 0.1) < 0.1 * simclr.info_nce(collapsed, collapsed, 0.1)  # measured 0.31 vs 8.29


def test_two_ranks_equal_one_process(tmp_path):
    single, ddp = ddp_vs_single_process("simclr", tmp_path, "--arch", "resnet18", "--proj-hidden", "64", "--proj-dim", "16")
    assert_same_step(single, ddp)


def test_resume_replays_training_exactly(tmp_path, monkeypatch):
    flags = ["--data", "shapes:16:96", "--arch", "resnet18", "--batch-size", "32", "--epochs", "2",
             "--knn-every", "0", "--workers", "0", "--proj-hidden", "64"]
    straight, at_kill, resumed = straight_and_preempted(simclr, flags, tmp_path, monkeypatch)
    assert at_kill["epoch"] == 1 and resumed["epoch"] == 2
    assert_same_state(straight, resumed)


def test_short_run_beats_random_init_knn_with_either_augmentation_path(tmp_path):
    """README's quick start, with views made on the device (the default for in-memory data) and by
    the torchvision pipeline in DataLoader workers (--cpu-augment): both learn, and equally well."""
    log, checkpoint, stdout = short_run("simclr", QUICK + ["--knn-every", "8"], tmp_path / "device")
    cpu_log, _, _ = short_run("simclr", QUICK + ["--knn-every", "8", "--cpu-augment"], tmp_path / "cpu")
    random_init, trained, trained_cpu = log[0]["knn_top1"], log[-1]["knn_top1"], cpu_log[-1]["knn_top1"]
    # Measured on 2 CPU cores (2000 val images, so ±0.01 from the val sample; chance 0.10), device / torchvision:
    #   seed 0: 0.286 -> 0.409 / 0.337    seed 1: 0.287 -> 0.383 / 0.367    seed 2: 0.307 -> 0.324 / 0.361
    # (those at base-lr 8). With the official loss scale (loss_a + loss_b, issue 13) the biases and norms, which LARS
    # does not adapt, move twice as fast: at base-lr 8 the torchvision path's loss rose in epoch 2 and it ended at
    # 0.282 (device 0.395); at base-lr 4, seed 0: device 0.286 -> 0.406, torchvision 0.383.
    # The same commit on another 2-core machine (same torch 2.14.1, other CPU kernels): device 0.3875, torchvision
    # 0.3095. A run this short is chaotic: float differences between machines move it by several points, as seeds
    # do. Neither path is ahead (device - torchvision: +0.07, +0.02, -0.04, +0.02, +0.08), so "as well as" is
    # asserted to within 0.10 and the torchvision path only to learn; the sharp check of the distributions is
    # test_augment.py's, and learning at a budget where gains are robust is test_learning.py's.
    assert cpu_log[0]["knn_top1"] == random_init  # same seed, same random encoder
    assert trained > random_init + 0.08 and trained_cpu > random_init + 0.01, (random_init, trained, trained_cpu)
    assert abs(trained - trained_cpu) < 0.10, (trained, trained_cpu)
    assert checkpoint["encoder_config"] == dict(arch="vit_nano", image_size=32, patch_size=8)
