"""DINO: the loss is the paper's sum over view pairs, the centre is a global-batch EMA, the schedules
are the recipe's, the teacher and the frozen last layer do not move by gradient, one DDP step equals
one big-batch step, resume is exact, attention maps are written, and a short run learns."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import common
import dino
import shapes
from helpers import assert_same_step, ddp_vs_single_process, moved_online_and_its_ema, short_run

# CPU scale: vit_nano at 32 px (16 px local crops = 4 patches), a small head and softmax width.
QUICK = ["--data", "shapes:32:500:1000", "--arch", "vit_nano", "--patch-size", "8", "--out-dim", "1024",
         "--head-hidden", "256", "--head-bottleneck", "64", "--local-crops", "2", "--epochs", "2", "--batch-size", "50",
         "--base-lr", "2.5e-3", "--warmup-epochs", "1", "--warmup-teacher-temp-epochs", "0", "--teacher-temp", "0.04",
         "--momentum-teacher", "0.99", "--freeze-last-layer", "0", "--workers", "0", "--seed", "1"]
SMALL_HEAD = ["--out-dim", "256", "--head-hidden", "64", "--head-bottleneck", "32"]
NANO = ["--arch", "vit_nano", "--patch-size", "8", *SMALL_HEAD]



def test_loss_equals_double_loop_over_view_pairs():
    torch.manual_seed(0)
    B, K, V = 3, 10, 5  # 2 global + 3 local crops
    student, teacher, center = torch.randn(V * B, K), torch.randn(2 * B, K), torch.randn(1, K)
    tau_t, tau_s = 0.05, 0.1
    total, pairs = 0.0, 0
    for i in range(2):  # teacher global crop i
        for v in range(V):  # student crop v, never the same crop
            if v == i:
                continue
            for b in range(B):
                p_t = torch.exp((teacher[i * B + b] - center[0]) / tau_t)
                p_t = p_t / p_t.sum()
                p_s = torch.exp(student[v * B + b] / tau_s)
                p_s = p_s / p_s.sum()
                total += -(p_t * torch.log(p_s)).sum() / B
            pairs += 1
    assert pairs == 2 * V - 2
    torch.testing.assert_close(dino.dino_loss(student, teacher, center, tau_t, tau_s), total / pairs)


def test_center_is_an_ema_of_the_teacher_mean():
    center, teacher = torch.randn(1, 6), torch.randn(8, 6)
    expected = 0.9 * center + 0.1 * teacher.mean(0, keepdim=True)
    dino.update_center(center, teacher, 0.9)
    torch.testing.assert_close(center, expected)  # over all ranks: test_two_ranks_equal_one_process...


def test_defaults_are_the_official_vanilla_run():
    """main_dino.py's defaults, the README's vanilla run (69.3% k-NN): one recipe, not a hybrid."""
    args = dino.get_args_parser().parse_args(["--data", "shapes"])
    assert ((args.arch, args.patch_size, args.epochs, args.batch_size, args.local_crops, args.out_dim)
            == ("vit_small", 16, 100, 512, 8, 65536))
    assert ((args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs, args.norm_last_layer)
            == (0.04, 0.04, 0, True))
    assert ((args.base_lr, args.min_lr, args.warmup_epochs, args.weight_decay, args.weight_decay_end)
            == (5e-4, 1e-6, 10, 0.04, 0.4))
    assert (args.momentum_teacher, args.clip_grad, args.freeze_last_layer, args.drop_path) == (0.996, 3.0, 1, 0.1)
    assert {dino.teacher_temperature(epoch, args) for epoch in range(100)} == {0.04}


def test_norm_last_layer_and_fp32_head():
    """Official DINOHead: weight_norm(Linear) with g filled with 1; g frozen with norm_last_layer, else
    trained, weight-decayed (a (K, 1) tensor) and averaged into the teacher. The last layer runs in fp32."""
    flags = ["--data", "shapes", "--image-size", "16", "--arch", "vit_nano", "--patch-size", "8", *SMALL_HEAD]
    for norm in (True, False):
        args = dino.get_args_parser().parse_args(flags + ["--norm-last-layer" if norm else "--no-norm-last-layer"])
        model = dino.build_model(args)
        head = model.student.head
        gain, direction = (head.last_layer.parametrizations.weight.original0,
                           head.last_layer.parametrizations.weight.original1)
        assert gain.shape == (256, 1) and (gain == 1).all() and gain.requires_grad != norm
        decayed, not_decayed = common.param_groups(model.student, 0.04)
        assert any(p is gain for p in decayed["params"]) != norm and not any(p is gain for p in not_decayed["params"])
        x = torch.randn(3, 32)
        # rows g·v/‖v‖
        torch.testing.assert_close(head.last_layer(x), x @ (gain * F.normalize(direction, dim=1)).T)
        with torch.no_grad():
            gain.mul_(2.0)
        dino.momentum_update(model, 0.75)
        teacher_gain = model.teacher.head.last_layer.parametrizations.weight.original0
        torch.testing.assert_close(teacher_gain, torch.full_like(teacher_gain, 0.75 + 0.25 * 2.0))  # EMA of g
    with torch.autocast("cpu", torch.bfloat16):
        bottleneck_input = torch.randn(5, 128)
        assert head.mlp(bottleneck_input).dtype == torch.bfloat16  # the MLP runs in bf16 ...
        assert head(bottleneck_input).dtype == torch.float32  # ... the last layer does not


def test_position_embedding_is_interpolated_as_the_official_code():
    """vision_transformer.py interpolate_pos_encoding: bicubic with scale_factor (n + 0.1)/g, not size=n."""
    torch.manual_seed(0)
    vit = common.build_encoder("vit_nano", 32, 8)  # a 4x4 grid
    with torch.no_grad():
        vit.pos_embed.normal_()
    x = torch.randn(1, 3, 24, 24)  # a 3x3 grid
    tokens = vit.embed(x)
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    official = F.interpolate(grid, scale_factor=(3.1 / 4, 3.1 / 4), mode="bicubic").flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, vit.patch_embed(x).flatten(2).transpose(1, 2) + official)
    resized = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert (official - resized).abs().max() > 1e-3  # the two calls differ: the test can tell them apart


def test_teacher_temperature_and_momentum_schedules():
    args = dino.get_args_parser().parse_args(["--data", "shapes", "--teacher-temp", "0.07",
                                              "--warmup-teacher-temp-epochs", "30"])
    # The boosted run: τ_t 0.04 -> 0.07 linearly over 30 epochs (reached at epoch 29, as np.linspace), then flat.
    temps = [dino.teacher_temperature(epoch, args) for epoch in range(100)]
    assert temps[0] == pytest.approx(0.04) and temps[29] == pytest.approx(0.07) and temps[99] == pytest.approx(0.07)
    assert temps[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert all(a <= b for a, b in zip(temps, temps[1:]))
    total, per_epoch, lr = 1000, 10, 1e-3
    at = lambda step: dino.schedules(step, total, per_epoch, lr, args)  # noqa: E731
    assert at(0)["momentum"] == pytest.approx(0.996) and at(500)["momentum"] == pytest.approx(0.998)
    assert at(total)["momentum"] == pytest.approx(1.0)
    assert at(0)["weight_decay"] == pytest.approx(0.04) and at(total)["weight_decay"] == pytest.approx(0.4)
    # lr warm-up as np.linspace(0, lr, 100) (utils.cosine_scheduler): the peak at step 99, then the cosine.
    warmup = list(np.linspace(0, lr, 100))
    assert [at(step)["lr"] for step in range(100)] == pytest.approx(warmup, abs=1e-12)
    assert at(100)["lr"] == pytest.approx(lr) and at(total)["lr"] == pytest.approx(1e-6)
    # momentum_update: teacher <- m teacher + (1 - m) student, for every parameter.
    args = dino.get_args_parser().parse_args(["--data", "shapes", "--image-size", "16", "--arch", "vit_nano",
                                              "--patch-size", "8", *SMALL_HEAD])
    model = dino.build_model(args)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.teacher.parameters()]
    dino.momentum_update(model, 0.9)
    for t0, t, s in zip(before, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)


def test_teacher_output_is_the_ema_network_once_the_student_has_moved():
    """The teacher's targets (and the centre fed by them) come from the EMA of the student, not the student."""
    args = dino.get_args_parser().parse_args(["--data", "shapes", "--image-size", "16", *NANO])
    torch.manual_seed(0)
    model = dino.build_model(args)
    ema = moved_online_and_its_ema(model.student, lambda m: dino.momentum_update(model, m))
    model.eval()  # no drop path in the student
    crops = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(2)]
    center = model.center.clone()
    loss, teacher_out, _ = dino.training_step(model, crops, args)
    with torch.no_grad():
        torch.testing.assert_close(teacher_out, ema(crops[:2]))
        torch.testing.assert_close(loss, dino.dino_loss(model.student(crops), ema(crops[:2]), center,
                                                     dino.teacher_temperature(0, args), args.student_temp))
        assert (teacher_out - model.student(crops[:2])).abs().max() > 1e-2  # the test can tell the two apart


def test_teacher_gets_no_gradient_last_layer_is_frozen_in_epoch_one_and_resume_is_exact(tmp_path, monkeypatch):
    flags = ["--data", "shapes:16:64", *NANO, "--local-crops", "2", "--batch-size", "32", "--epochs", "2",
             "--knn-every", "0", "--workers", "0"]  # 16 px, 2 x 2 steps: every check below, in about a second
    args = dino.get_args_parser().parse_args(flags + ["--image-size", "16"])
    torch.manual_seed(0)
    model = dino.build_model(args)
    crops = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * 2
    loss = dino.training_step(model, crops, args)[0]
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    # g is frozen (--norm-last-layer)
    assert all(p.grad is not None for p in model.student.parameters() if p.requires_grad)

    # A straight 2-epoch run. Its epoch-1 checkpoint is also copied to another folder: exactly what a
    # job killed right after its first checkpoint leaves behind, from which a new run must resume.
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    torch.manual_seed(args.seed)  # as main does before building: the same initial weights
    initial = dino.build_model(args).state_dict()
    saved = []
    real_save = common.save_checkpoint

    def save_and_keep(state, path):
        saved.append({k: v.clone() for k, v in state["model"].items()})
        real_save(state, path)
        if state["epoch"] == 1:
            real_save(state, str(preempted / "checkpoint.pth"))
    monkeypatch.setattr(common, "save_checkpoint", save_and_keep)
    dino.main(dino.get_args_parser().parse_args(flags + ["--output-dir", str(straight)]))
    last = "student.head.last_layer.parametrizations.weight.original1"  # v; g is frozen at 1 (--norm-last-layer)
    assert torch.equal(saved[0][last], initial[last])  # epoch 1: frozen (no gradient, hence no decay either)
    assert not torch.equal(saved[1][last], initial[last])  # epoch 2: trained
    assert not torch.equal(saved[0]["student.head.mlp.0.weight"], initial["student.head.mlp.0.weight"])
    assert not torch.equal(saved[0]["center"], initial["center"])

    monkeypatch.setattr(common, "save_checkpoint", real_save)
    dino.main(dino.get_args_parser().parse_args(flags + ["--output-dir", str(preempted)]))  # auto-resumes at epoch 1
    a = torch.load(straight / "checkpoint.pth", weights_only=False)
    b = torch.load(preempted / "checkpoint.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for name, tensor in a["model"].items():  # student, teacher and centre
        torch.testing.assert_close(b["model"][name], tensor, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


def test_gradients_are_clipped_per_tensor():
    """The official utils.clip_gradients: each tensor's gradient to norm <= max_norm on its own; torch's
    clip_grad_norm_ would scale every tensor by one factor from their total norm."""
    grads = [torch.full((4,), 0.5), torch.full((9,), 2.0), -torch.arange(16.0)]  # norms 1, 6 and 35.2
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads] + [torch.nn.Parameter(torch.zeros(2))]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    dino.clip_gradients(params, 3.0)
    assert torch.equal(params[0].grad, grads[0])  # under the limit: untouched
    for p, g in zip(params[1:3], grads[1:]):  # over it: norm 3, direction kept
        torch.testing.assert_close(p.grad, g * 3.0 / g.norm(), rtol=1e-5, atol=0)
    assert params[3].grad is None  # no gradient (the frozen last layer): skipped


def test_loop_clips_every_gradient_and_follows_the_lr_and_weight_decay_schedules(tmp_path, monkeypatch):
    """What AdamW sees at each of the 8 steps of a 2-epoch run: every gradient tensor clipped to --clip-grad,
    the lr warm-up then cosine, and the weight decay on its cosine 0.04 -> 0.4 (the decayed group only)."""
    seen, real_step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        groups = self.param_groups
        seen.append(dict(lr=[g["lr"] for g in groups], weight_decay=[g["weight_decay"] for g in groups],
                         norms=[p.grad.norm().item() for g in groups for p in g["params"] if p.grad is not None]))
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    flags = ["--data", "shapes:16:64", *NANO, "--local-crops", "2", "--batch-size", "16", "--epochs", "2",
             "--warmup-epochs", "1", "--clip-grad", "1e-3", "--knn-every", "0", "--workers", "0",
             "--output-dir", str(tmp_path)]
    dino.main(dino.get_args_parser().parse_args(flags))
    K, warmup, lr = 8, 4, 5e-4 * 16 / 256  # 4 steps an epoch
    assert len(seen) == K
    for s, step in enumerate(seen):  # warm-up as np.linspace(0, lr, 4), then a cosine to --min-lr 1e-6
        cosine = 1e-6 + (lr - 1e-6) * (1 + math.cos(math.pi * (s - warmup) / (K - warmup))) / 2
        assert step["lr"] == pytest.approx([lr * s / (warmup - 1) if s < warmup else cosine] * 2)
        assert step["weight_decay"] == pytest.approx([0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * s / K)) / 2, 0.0])
        # clipping at 1e-3 binds at every step (the untrained gradients are far larger): each tensor at the limit
        assert max(step["norms"]) <= 1e-3 * (1 + 1e-5) and max(step["norms"]) > 0.99e-3
    assert seen[-1]["weight_decay"][0] == pytest.approx(0.3863, abs=1e-4)  # the last step, near the end value 0.4


def test_multi_crop_shapes_at_32_and_224_px():
    args = dino.get_args_parser().parse_args(["--data", "shapes", "--image-size", "32", *NANO])
    model = dino.build_model(args)
    image = shapes.Shapes("train", 32, 1)[0][0]
    multi_crop = lambda *flags: dino.augmentations(  # noqa: E731
        dino.get_args_parser().parse_args(["--data", "shapes", *flags]))
    for size, patch, local in ((32, 8, 16), (224, 16, 96)):
        crops = multi_crop("--image-size", str(size), "--patch-size", str(patch), "--local-crops", "3")(
            image.resize((size, size)))
        assert [c.shape for c in crops] == [(3, size, size)] * 2 + [(3, local, local)] * 3
    crops = [c[None] for c in multi_crop("--image-size", "32", "--patch-size", "8", "--local-crops", "3")(image)]
    student, teacher = model(crops)  # one pass per resolution through the student, globals through the teacher
    assert student.shape == (5, 256) and teacher.shape == (2, 256)
    # never below one patch
    assert multi_crop("--image-size", "32", "--arch", "vit_nano", "--patch-size", "16").transforms[-1].size == 16
    # ResNets: 96/224 of the size, unrounded
    assert multi_crop("--image-size", "32", "--arch", "resnet18").transforms[-1].size == 14


def test_two_ranks_equal_one_process_and_share_the_centre_of_the_global_batch(tmp_path):
    # tests/ddp_step.py's step; each rank saves its buffers: 2 gloo ranks x 4 images must give the loss, gradients
    # AND centre of 1 process x 8 images (without the all-reduce, each rank's c would be the EMA of its own half).
    single, ddp = ddp_vs_single_process("dino", tmp_path, *NANO)
    assert_same_step(single, ddp)
    expected = torch.load(tmp_path / "single.pt.buffers0")["center"]
    assert expected.abs().sum() > 0  # the step did update it
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"ddp.pt.buffers{rank}")["center"], expected, atol=1e-6,
                                   rtol=1e-5)


def test_resnet_recipe_trains_with_sgd(tmp_path):
    """The official README's ResNet-50 run uses SGD (momentum 0.9) with a constant weight decay."""
    flags = ["--data", "shapes:16:32", "--arch", "resnet18", *SMALL_HEAD, "--local-crops", "2", "--batch-size", "16",
             "--epochs", "1", "--optimizer", "sgd", "--base-lr", "0.03", "--weight-decay", "1e-4",
             "--weight-decay-end", "1e-4", "--knn-every", "0", "--workers", "0", "--output-dir", str(tmp_path)]
    dino.main(dino.get_args_parser().parse_args(flags))
    groups = torch.load(tmp_path / "checkpoint.pth", weights_only=False)["optimizer"]["param_groups"]
    assert (groups[0]["momentum"] == 0.9 and "betas" not in groups[0]
            and groups[0]["weight_decay"] == pytest.approx(1e-4))


def test_attention_maps_need_a_vit(tmp_path):
    args = dino.get_args_parser().parse_args(["--data", "shapes:16:64", "--arch", "resnet18", "--attention-maps", "1",
                                              "--output-dir", str(tmp_path)])
    with pytest.raises(common.UserError, match="needs a ViT"):
        dino.main(args)


def test_short_run_trains_and_writes_attention_maps(tmp_path):
    log, checkpoint, _ = short_run("dino", QUICK + ["--knn-every", "2", "--attention-maps", "2"], tmp_path)
    random_init, trained = log[0]["knn_top1"], log[-1]["knn_top1"]
    # A plumbing run (20 steps, with local crops): no collapse (a collapsed teacher sits at chance, 0.10), the
    # entropy logged, the teacher exported, the attention grid. That DINO learns is test_learning.py's: the
    # benchmark recipe gains 14-18 linear-probe points over its random init in 468 steps.
    assert trained > 0.2, (random_init, trained)
    # The teacher's entropy (nats), away from both failures: log K = 6.93 for a uniform teacher (what centering
    # alone drifts to), 0 for one dimension (sharpening alone). Measured 3.96 and 3.87 (3.77 at random init).
    entropies = [r["teacher_entropy"] for r in log[1:]]
    assert all(0.15 * math.log(1024) < h < 0.7 * math.log(1024) for h in entropies), entropies
    assert all(0 < r["embedding_std"] for r in log[1:])
    # the checkpoint's encoder (which short_run loaded strictly, as probe.py does) is the teacher backbone
    assert all(torch.equal(v, checkpoint["model"][f"teacher.backbone.{k}"]) for k, v in checkpoint["encoder"].items())
    # 4 fixed val images, one grid: a row per image, the image + one overlay per head (vit_nano: 4), 32 px tiles
    # with 1 px padding: 4 x 5 tiles of 33 px plus the outer pad
    files = sorted(p.name for p in (tmp_path / "attention").iterdir())
    assert files == ["epoch0002.png"]
    assert torchvision.io.read_image(str(tmp_path / "attention" / files[0])).shape[-2:] == (4 * 33 + 1, 5 * 33 + 1)


def test_attention_maps_show_the_last_blocks_cls_attention():
    """The maps' attention, recomputed by a hook (the fused kernel never forms it), equals softmax(q kᵀ / √d) of the
    last block on its own input, written out here block by block; each CLS row sums to 1 with the CLS entry."""
    torch.manual_seed(0)
    vit = common.build_encoder("vit_nano", 32, 8).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1), vit.embed(images)], 1)  # (2, 17, 128)
        for block in vit.blocks[:-1]:
            x = block(x)
        last = vit.blocks[-1]
        q, k, _ = last.attn.qkv(last.norm1(x)).reshape(2, 17, 3, 4, 32).permute(2, 0, 3, 1, 4)  # 3 x (2, 4, 17, 32)
        full = (q @ k.transpose(-2, -1) / math.sqrt(32)).softmax(-1)  # (2, 4, 17, 17)
    attention = dino.cls_attention(vit, images)
    torch.testing.assert_close(attention, full[:, :, 0, 1:])
    assert attention.shape == (2, 4, 16) and (attention.sum(-1) < 1).all()  # the rest is the CLS token's own share
