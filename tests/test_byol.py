"""BYOL: the loss is the paper's formula, no gradient reaches the target network, the target is the EMA
of the online network on the paper's τ schedule, one DDP step equals one big-batch step, resume is
exact (target included). That it learns: tests/test_learning.py."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import byol
import common
from helpers import (assert_same_state, assert_same_step, ddp_vs_single_process, error_line, moved_online_and_its_ema,
                     run_script, straight_and_preempted)

TINY = ["--arch", "vit_nano", "--patch-size", "4", "--proj-hidden", "32", "--proj-dim", "16", "--pred-hidden", "32"]


def tiny_model():
    torch.manual_seed(0)
    args = byol.get_args_parser().parse_args(["--data", "shapes", "--image-size", "16", *TINY])
    return byol.build_model(args), args


def test_regression_loss_equals_formula():
    torch.manual_seed(0)
    p, z = torch.randn(6, 16), torch.randn(6, 16)
    # ‖p/‖p‖ − z/‖z‖‖², written out per sample, averaged over the batch; it equals 2 − 2·cos(p, z)
    expected = torch.stack([((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(6)]).mean()
    torch.testing.assert_close(byol.regression_loss(p, z), expected)
    torch.testing.assert_close(byol.regression_loss(p, z), (2 - 2 * F.cosine_similarity(p, z)).mean())


def test_official_heads_and_zero_init_residuals():
    """Official BYOL (utils/networks.py): the MLPs' last Linear has no bias; haiku's ResNet BlockV1 starts
    each residual branch at zero (last BN scale_init zeros); crops are resized bicubically (utils/dataset.py)."""
    args = byol.get_args_parser().parse_args(["--data", "shapes", "--image-size", "32", "--arch", "resnet18",
                                              "--proj-hidden", "64", "--proj-dim", "16", "--pred-hidden", "64"])
    model = byol.build_model(args)
    for head in (model.projector, model.predictor):
        assert isinstance(head[-1], torch.nn.Linear) and head[-1].bias is None
    blocks = [m for m in model.encoder.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    assert blocks and all((block.bn2.weight == 0).all() for block in blocks)
    assert all(view.interpolation == "bicubic" for view in byol.augmentations(args).transforms)


def test_training_step_sums_both_directions():
    model, args = tiny_model()
    model.eval()  # running BN statistics: two forwards give the same numbers
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    loss, z = byol.training_step(model, views, args)
    p1, p2, z1, z2 = model(*views)
    expected = (2 - 2 * F.cosine_similarity(p1, z2)).mean() + (2 - 2 * F.cosine_similarity(p2, z1)).mean()  # §3.1
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z, model.target(views[0]))  # the collapse signal is the target projection


def test_no_gradient_reaches_the_target_network():
    model, args = tiny_model()
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    byol.training_step(model, views, args)[0].backward()
    assert all(not q.requires_grad and q.grad is None for q in model.target.parameters())
    online = [*model.encoder.parameters(), *model.projector.parameters(), *model.predictor.parameters()]
    assert all(q.grad is not None for q in online)
    p, z = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    assert torch.autograd.grad(byol.regression_loss(p, z), z, allow_unused=True)[0] is None  # sg(z')
    # The optimiser holds only the online parameters (the target moves by EMA alone).
    params = {id(q) for group in common.param_groups(model, 1e-6) for q in group["params"]}
    assert params == {id(q) for q in online}


def test_momentum_update_is_an_ema_of_the_online_network():
    model, _ = tiny_model()
    for q in [*model.encoder.parameters(), *model.projector.parameters()]:
        q.data.add_(torch.randn_like(q))  # online weights move away from the target's
    online = [q.clone() for q in [*model.encoder.parameters(), *model.projector.parameters()]]
    before = [q.clone() for q in model.target.parameters()]
    byol.momentum_update(model, 0.99)
    for xi, theta, after in zip(before, online, model.target.parameters()):
        torch.testing.assert_close(after, 0.99 * xi + 0.01 * theta)  # ξ ← τξ + (1 − τ)θ
    byol.momentum_update(model, 1.0)  # τ = 1 (the last step): the target stops
    for xi, theta, after in zip(before, online, model.target.parameters()):
        torch.testing.assert_close(after, 0.99 * xi + 0.01 * theta)


def test_the_target_side_is_the_ema_network_once_the_online_one_has_moved():
    """The step's targets z' come from the EMA of the online f and g, not from the online network itself."""
    model, args = tiny_model()
    online = nn.Sequential(model.encoder, model.projector)
    ema = moved_online_and_its_ema(online, lambda tau: byol.momentum_update(model, tau))
    model.eval()
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    loss, z = byol.training_step(model, views, args)
    with torch.no_grad():
        p1, p2 = (model.predictor(online(x)) for x in views)

        def loss_with(target):  # §3.1, each view's prediction against the other view's target projection
            return sum((2 - 2 * F.cosine_similarity(p, target(x))).mean() for p, x in ((p1, views[1]), (p2, views[0])))
        torch.testing.assert_close(z, ema(views[0]))  # the collapse signal: view 1's target projection
        torch.testing.assert_close(loss, loss_with(ema))
        assert (z - online(views[0])).abs().max() > 1e-2 and (loss - loss_with(online)).abs() > 1e-3  # they differ


def test_resume_replays_training_exactly_and_tau_follows_the_schedule(tmp_path, monkeypatch):
    flags = ["--data", "shapes:16:64", *TINY, "--batch-size", "32", "--epochs", "2", "--knn-every", "0",
             "--workers", "0"]
    taus = []
    real_update = byol.momentum_update
    monkeypatch.setattr(byol, "momentum_update", lambda model, tau: (taus.append(tau), real_update(model, tau)))
    straight, at_kill, resumed = straight_and_preempted(byol, flags, tmp_path, monkeypatch)
    K = 4  # 2 epochs x 2 steps
    # τ_k = 1 − (1 − τ_base)(cos(πk/K) + 1)/2 for k = 0 .. K−1 (§3.3), after every optimiser step
    schedule = [1 - (1 - 0.996) * (math.cos(math.pi * k / K) + 1) / 2 for k in range(K)]
    # straight run: k = 0..3; pre-empted run: k = 0, 1 then killed; resumed run: continues at k = 2
    assert taus == pytest.approx(schedule + schedule[:2] + schedule[2:])
    assert at_kill["epoch"] == 1 and resumed["step"] == K
    assert any(name.startswith("target.") for name in straight["model"])
    assert_same_state(straight, resumed)  # online and target networks alike


def test_two_ranks_equal_one_process(tmp_path):
    single, ddp = ddp_vs_single_process("byol", tmp_path, "--arch", "resnet18", *TINY[4:])  # BN in the encoder too
    assert_same_step(single, ddp)
    assert not any(name.startswith("target.") for name in single["grads"])


def test_tau_base_out_of_range(tmp_path):
    line = error_line(run_script("byol.py", "--data", "shapes:16:64", *TINY, "--tau-base", "1.5", "--batch-size", "8",
                                 "--knn-every", "0", "--workers", "0", "--output-dir", str(tmp_path)))
    assert "--tau-base 1.5 is not in [0, 1]" in line
