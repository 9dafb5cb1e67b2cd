"""MoCo v3 / v2: the losses are the formulas, the queue is FIFO, the key encoder follows θk ← m·θk + (1 − m)·θq
and gets no gradient, one DDP step equals one big-batch step, resume is exact (queue included), bad flag
combinations are one clear error, and a short v2 run (ResNet + queue) fills its queue. That they learn:
tests/test_learning.py."""
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import moco
from helpers import (assert_same_state, assert_same_step, ddp_vs_single_process, error_line, moved_online_and_its_ema,
                     one_process_and_two_ranks, run_script, short_run, straight_and_preempted)


def parse(*flags):
    return moco.get_args_parser().parse_args(["--data", "shapes:16:64", "--image-size", "16", *flags])


# A CPU-scale v2 run: resnet18 at 16 px with a queue (v3's learning run is tests/test_learning.py's).
V2_QUICK = ["--data", "shapes:16:256:500", "--version", "v2", "--arch", "resnet18", "--epochs", "2",
            "--batch-size", "32", "--queue-size", "192", "--base-lr", "0.1", "--momentum", "0.99",
            "--proj-hidden", "256", "--knn-every", "2", "--workers", "0"]
TINY_V3 = ["--arch", "vit_nano", "--patch-size", "8", "--proj-hidden", "32", "--proj-dim", "16"]
TINY_V2 = ["--version", "v2", "--arch", "resnet18", "--proj-hidden", "32", "--proj-dim", "16", "--queue-size", "32"]


def test_version_and_arch_pick_the_paper_recipe_and_heads():
    v3 = parse()
    assert (v3.arch, v3.optimizer, v3.base_lr, v3.weight_decay, v3.temperature, v3.warmup_epochs, v3.epochs) == \
        ("vit_small", "adamw", 1.5e-4, 0.1, 0.2, 40, 300)
    assert (v3.momentum, v3.proj_hidden, v3.proj_dim, v3.queue_size, v3.crop_min, v3.stop_grad_conv1) == \
        (0.99, 4096, 256, 0, 0.08, True)
    r50 = parse("--arch", "resnet50")
    assert (r50.optimizer, r50.base_lr, r50.weight_decay, r50.temperature, r50.epochs) == ("lars", 0.6, 1e-6, 1.0, 100)
    v2 = parse("--version", "v2")
    assert (v2.arch, v2.optimizer, v2.base_lr, v2.weight_decay, v2.batch_size, v2.epochs, v2.warmup_epochs) == \
        ("resnet50", "sgd", 0.03, 1e-4, 256, 200, 0)
    assert (v2.temperature, v2.momentum, v2.proj_hidden, v2.proj_dim, v2.queue_size) == (0.2, 0.999, 2048, 128, 65536)
    assert parse("--version", "v2", "--temperature", "0.1").temperature == 0.1  # a given flag beats the recipe

    linears = lambda module: [m for m in module.modules() if isinstance(m, nn.Linear)]  # noqa: E731
    vit = moco.build_model(parse(*TINY_V3))
    assert len(linears(vit.projector)) == 3 and len(linears(vit.predictor)) == 2  # v3 ViT: 3-layer projector
    assert not any(p.requires_grad for p in vit.encoder.patch_embed.parameters())  # frozen patch projection
    assert not vit.encoder.pos_embed.requires_grad  # fixed sin-cos positions
    resnet = moco.build_model(parse("--arch", "resnet18", "--proj-hidden", "32"))
    assert len(linears(resnet.projector)) == 2 and len(linears(resnet.predictor)) == 2
    assert resnet.encoder.layer1[0].bn2.weight.abs().sum() == 0  # zero_init_residual
    v2_model = moco.build_model(parse(*TINY_V2))
    assert len(linears(v2_model.projector)) == 2 and isinstance(v2_model.predictor, nn.Identity)
    assert v2_model.queue.shape == (32, 16) and not any(isinstance(m, nn.BatchNorm1d)
                                                        for m in v2_model.projector.modules())


def test_official_v3_vit_heads_init_and_positions():
    """Official vits.py VisionTransformerMoCo: ViT-S has 12 heads (DINO's has 6), and the count travels
    in the checkpoint's encoder_config; Linears Xavier-uniform with q, k, v as separate (D, D) matrices;
    CLS token N(0, 1e-6); the sin-cos embedding's first half encodes the row (y), the second the column."""
    args = parse("--image-size", "32", "--proj-hidden", "64", "--proj-dim", "16")  # vit_small/16: a 2x2 grid
    config = moco.encoder_config_of(args)
    assert config["num_heads"] == 12
    model = moco.build_model(args)
    assert (model.encoder.blocks[0].attn.num_heads == 12
            and common.build_encoder(**config).blocks[0].attn.num_heads == 12)
    assert "num_heads" not in moco.encoder_config_of(parse("--arch", "vit_nano"))  # other sizes keep their usual count
    D = 384
    qkv, fc1 = model.encoder.blocks[0].attn.qkv.weight, model.encoder.blocks[0].mlp.fc1.weight
    for weight, bound in ((qkv, math.sqrt(6 / (D + D))), (fc1, math.sqrt(6 / (D + 4 * D)))):
        assert weight.abs().max() <= bound and weight.abs().max() > 0.99 * bound  # U(-bound, bound)
    assert model.encoder.cls_token.std() < 1e-5
    pos = model.encoder.pos_embed[0]  # (1 + 4, D): CLS, then (row, col) = (0, 0), (0, 1), (1, 0), (1, 1)
    omega = 1 / 10000 ** (torch.arange(D // 4) / (D // 4))
    for token, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)], start=1):
        expected = torch.cat([torch.sin(row * omega), torch.cos(row * omega),
                              torch.sin(col * omega), torch.cos(col * omega)])
        torch.testing.assert_close(pos[token], expected, atol=1e-5, rtol=0)
    assert (pos[0] == 0).all()


def test_official_resnet_heads_and_v2_lr_per_epoch(tmp_path, monkeypatch):
    """v3 ResNet (builder.py _build_mlp): no bias anywhere in the heads, the predictor's output has no BN.
    v2 (moco's main_moco.py --cos): the lr follows the cosine once per epoch."""
    resnet = moco.build_model(parse("--arch", "resnet18", "--proj-hidden", "32"))
    assert all(m.bias is None for m in [*resnet.projector.modules(), *resnet.predictor.modules()]
               if isinstance(m, nn.Linear))
    assert isinstance(resnet.predictor[-1], nn.Linear)
    flags = ["--data", "shapes:16:64", *TINY_V2, "--batch-size", "16", "--epochs", "2", "--knn-every", "0",
             "--workers", "0"]
    lrs = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step",
                        lambda self, *a, **k: (lrs.append(self.param_groups[0]["lr"]), real_step(self, *a, **k))[1])
    moco.main(moco.get_args_parser().parse_args(flags + ["--output-dir", str(tmp_path)]))
    lr = 0.03 * 16 / 256
    assert lrs == pytest.approx([lr] * 4 + [lr * 0.5 * (1 + math.cos(math.pi / 2))] * 4)  # 4 steps per epoch


def test_in_batch_loss_equals_formula_times_two_tau():
    torch.manual_seed(0)
    q, k, tau = torch.randn(6, 16), torch.randn(6, 16), 0.2
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    losses = []
    for i in range(6):  # -log exp(q_i·k_i/τ) / Σ_j exp(q_i·k_j/τ): the other images' keys are the negatives
        losses.append(-torch.log(torch.exp(qn[i] @ kn[i] / tau)
                                 / sum(torch.exp(qn[i] @ kn[j] / tau) for j in range(6))))
    torch.testing.assert_close(moco.contrastive_loss(q, k, tau), 2 * tau * torch.stack(losses).mean())
    with torch.autocast("cpu", torch.bfloat16):  # the logits stay fp32 under the loop's bf16 autocast
        torch.testing.assert_close(moco.contrastive_loss(q, k, tau), 2 * tau * torch.stack(losses).mean())


def test_queue_loss_equals_formula():
    torch.manual_seed(0)
    q, k, tau = torch.randn(5, 16), torch.randn(5, 16), 0.2
    queue = F.normalize(torch.randn(12, 16), dim=1)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    losses = []
    for i in range(5):  # the positive against the K queued keys only: in-batch keys are not negatives
        positive = torch.exp(qn[i] @ kn[i] / tau)
        losses.append(-torch.log(positive / (positive + sum(torch.exp(qn[i] @ queue[j] / tau) for j in range(12)))))
    torch.testing.assert_close(moco.contrastive_loss(q, k, tau, queue), torch.stack(losses).mean())
    with torch.autocast("cpu", torch.bfloat16):  # negatives fp32, as the positive
        torch.testing.assert_close(moco.contrastive_loss(q, k, tau, queue), torch.stack(losses).mean())


def test_queue_is_fifo_and_its_pointer_wraps_around():
    model = moco.MoCo(nn.Linear(3, 4), nn.Identity(), nn.Identity(), queue_size=6, dim=4)
    batches = [torch.randn(2, 4) for _ in range(4)]
    unit = lambda x: F.normalize(x, dim=1)  # noqa: E731
    for step, batch in enumerate(batches[:3]):
        moco.enqueue(model, batch)
        assert model.queue_ptr == (2 * step + 2) % 6
    torch.testing.assert_close(model.queue, unit(torch.cat(batches[:3])))  # full, oldest first
    moco.enqueue(model, batches[3])  # the oldest batch is replaced, the others stay
    torch.testing.assert_close(model.queue, unit(torch.cat([batches[3], batches[1], batches[2]])))
    assert model.queue_ptr == 2
    assert "queue" in model.state_dict() and "queue_ptr" in model.state_dict()  # checkpointed with the model


def test_momentum_update_formula():
    model = moco.MoCo(nn.Linear(3, 4), nn.Linear(4, 2), nn.Identity(), queue_size=0, dim=2)
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))  # the query side has moved away from the key side
    keys_before = [p.clone() for p in model.momentum_encoder.parameters()]
    moco.momentum_update(model, 0.9)
    online = [*model.encoder.parameters(), *model.projector.parameters()]
    for before, query, after in zip(keys_before, online, model.momentum_encoder.parameters(), strict=True):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * query)
    keys_before = [p.clone() for p in model.momentum_encoder.parameters()]
    moco.momentum_update(model, 1.0)  # m = 1, the end of v3's schedule: the keys stop moving
    for before, after in zip(keys_before, model.momentum_encoder.parameters()):
        assert torch.equal(after, before)


@pytest.mark.parametrize("flags", [TINY_V3, TINY_V2], ids=["v3", "v2"])
def test_key_side_gets_no_gradient_and_queue_advances(flags):
    torch.manual_seed(0)
    args = parse(*flags)
    model = moco.build_model(args)
    views = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    queue_before = model.queue.clone() if args.version == "v2" else None
    loss, z = moco.training_step(model, views, args)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.momentum_encoder.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if args.version == "v2":  # the 8 new keys entered the queue in batch order, the rest is unchanged
        assert model.queue_ptr == 8 and torch.equal(model.queue[8:], queue_before[8:])
        with torch.no_grad():  # one process: the shuffle permutes one BN batch, which changes nothing
            keys = F.normalize(model.momentum_encoder(views[1]), dim=1)
        torch.testing.assert_close(model.queue[:8], keys, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("flags", [TINY_V3, TINY_V2], ids=["v3", "v2"])
def test_keys_come_from_the_momentum_encoder_once_the_query_side_has_moved(flags):
    """v3's keys (in the loss) and v2's keys (in the loss and in the queue) are the momentum encoder's: the EMA
    of the query encoder and projector, not the query side itself."""
    torch.manual_seed(0)
    args = parse(*flags)
    model = moco.build_model(args)
    online = nn.Sequential(model.encoder, model.projector)
    ema = moved_online_and_its_ema(online, lambda m: moco.momentum_update(model, m))
    model.eval()  # BN running statistics: v2's shuffle changes nothing on one process
    views = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    queue = model.queue.clone() if args.version == "v2" else None
    loss, _ = moco.training_step(model, views, args)
    with torch.no_grad():
        q1, q2, tau = *(model.predictor(online(x)) for x in views), args.temperature

        def loss_with(keys):  # v3: symmetrised, in-batch negatives; v2: view 1 queries, the queue as negatives
            if args.version == "v3":
                return moco.contrastive_loss(q1, keys(views[1]), tau) + moco.contrastive_loss(q2, keys(views[0]), tau)
            return moco.contrastive_loss(q1, keys(views[1]), tau, queue)
        torch.testing.assert_close(loss, loss_with(ema))
        assert (loss - loss_with(online)).abs() > 1e-3  # the test can tell the two apart
        if args.version == "v2":  # the keys entering the queue are the momentum encoder's too
            torch.testing.assert_close(model.queue[:8], F.normalize(ema(views[1]), dim=1), atol=1e-5, rtol=1e-4)
            assert (model.queue[:8] - F.normalize(online(views[1]), dim=1)).abs().max() > 1e-2


def test_two_ranks_equal_one_process(tmp_path):
    # v3: keys gathered from both ranks (v2: the next test). Each rank's loss is the mean over its own queries
    # (as in the official code); their average (what the harness saves) and DDP's average of the gradients are
    # the 8-image step's.
    single, ddp = ddp_vs_single_process("moco", tmp_path, *TINY_V3)
    assert_same_step(single, ddp)


# tests/ddp_step.py's step, with a forward pre-hook on the key encoder that keeps the batch it embeds; then each
# rank saves that batch, its queue and its pointer.
WATCH_THE_KEY_ENCODER = """import os, runpy, sys, torch
sys.path.insert(0, os.getcwd())
import moco
seen, real_build = [], moco.build_model
def build_and_watch(args):
    model = real_build(args)
    model.momentum_encoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    return model
moco.build_model = build_and_watch
try:
    sys.argv = ["tests/ddp_step.py", *sys.argv[1:]]
    step = runpy.run_path("tests/ddp_step.py", run_name="ddp_step")
finally:
    moco.build_model = real_build
raw, embedded = step["raw_model"], torch.cat(seen)
with torch.no_grad():  # the keys of the global batch in image order, embedded here in one piece
    keys = torch.nn.functional.normalize(raw.momentum_encoder(step["views"][1]), dim=1)
torch.save(dict(seen=embedded, queue=raw.queue, ptr=raw.queue_ptr, keys_of=step["views"][1], keys=keys),
           sys.argv[2] + ".rank" + os.environ.get("RANK", "0"))
step["end_ranks"](step["dist_env"].world_size)
"""


def test_v2_shuffles_keys_across_ranks_and_every_rank_keeps_the_same_queue(tmp_path):
    """MoCo v2 on 2 gloo ranks x 4 images against 1 process x 8 (a ResNet: BN in the encoder). The key encoder
    of each rank must embed a shuffled share of the GLOBAL batch (shuffled BN, §3.3: per-GPU BN statistics
    would otherwise be a shortcut), and every rank must enqueue the keys of the whole global batch, unshuffled:
    each rank's queue and pointer equal the one process's. In eval mode (BN running statistics, as
    ddp_step.py runs) the shuffle changes no number, so only the hook can see it."""
    script = tmp_path / "watch_the_key_encoder.py"
    script.write_text(WATCH_THE_KEY_ENCODER)
    single, ddp = one_process_and_two_ranks(str(script), "moco", tmp_path, *TINY_V2)
    assert_same_step(torch.load(single), torch.load(ddp))  # loss and gradients, as for v3
    one = torch.load(single + ".rank0")
    ranks = [torch.load(f"{ddp}.rank{rank}") for rank in range(2)]
    batch = one["keys_of"]  # (8, 3, 32, 32): the global batch of the key view
    # which image of the global batch each rank's key encoder embedded, in the order it did
    drawn = [[int((batch - image).abs().flatten(1).amax(1).argmin()) for image in rank["seen"]] for rank in ranks]
    assert all(torch.equal(rank["seen"][i], batch[j]) for rank, rows in zip(ranks, drawn) for i, j in enumerate(rows))
    assert sorted(drawn[0] + drawn[1]) == list(range(8))  # the whole global batch, each image once
    assert set(drawn[0]) != {0, 1, 2, 3}, drawn  # shuffled ACROSS the ranks: rank 0 embeds some of rank 1's images
    torch.testing.assert_close(one["queue"][:8], one["keys"], atol=1e-5, rtol=1e-4)  # unshuffled: in image order
    for rank in ranks:
        assert rank["ptr"] == one["ptr"] == 8  # the 8 keys of the global batch entered, not this rank's 4
        torch.testing.assert_close(rank["queue"], one["queue"], atol=1e-5, rtol=1e-4)


def test_resume_replays_training_exactly_with_the_queue(tmp_path, monkeypatch):
    flags = ["--data", "shapes:16:64", "--version", "v2", "--arch", "vit_nano", "--patch-size", "8",
             "--batch-size", "16", "--queue-size", "48", "--proj-hidden", "32", "--epochs", "2", "--knn-every", "0",
             "--workers", "0"]
    straight, at_kill, resumed = straight_and_preempted(moco, flags, tmp_path, monkeypatch)
    assert at_kill["epoch"] == 1 and at_kill["model"]["queue_ptr"] == 4 * 16 % 48
    assert resumed["epoch"] == 2 and resumed["step"] == 8
    assert_same_state(straight, resumed)  # queue and pointer included


def test_v3_resume_replays_training_exactly_on_its_per_step_schedules(tmp_path, monkeypatch):
    """v3 moves the lr and the key momentum every step: a resume must pick both up at the saved step."""
    flags = ["--data", "shapes:16:64", *TINY_V3, "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1",
             "--knn-every", "0", "--workers", "0"]
    straight, at_kill, resumed = straight_and_preempted(moco, flags, tmp_path, monkeypatch)
    assert at_kill["epoch"] == 1 and (resumed["epoch"], resumed["step"]) == (2, 8)
    assert any(name.startswith("momentum_encoder.") for name in straight["model"])
    assert_same_state(straight, resumed)  # the momentum encoder included


@pytest.mark.parametrize("flags, message", [
    (["--version", "v2", "--queue-size", "100"],
     "--queue-size 100: MoCo v2 needs a positive multiple of the global --batch-size 16"),
    (["--version", "v2", "--queue-size", "0"], "--queue-size 0: MoCo v2 needs a positive multiple"),
    (["--queue-size", "64"],
     "--queue-size 64: MoCo v2 needs a positive multiple of the global --batch-size 16; MoCo v3 has no queue"),
], ids=["not-divisible", "v2-without-queue", "v3-with-queue"])
def test_bad_flag_combinations(tmp_path, flags, message):
    args = moco.get_args_parser().parse_args(["--data", "shapes:16:64", "--arch", "resnet18", "--batch-size", "16",
                                              "--workers", "0", "--output-dir", str(tmp_path), *flags])
    with pytest.raises(common.UserError, match=re.escape(message)):
        moco.main(args)


def test_bad_flags_exit_with_one_line_and_resume_checks_the_version(tmp_path):
    line = error_line(run_script("moco.py", "--data", "shapes:16:64", "--version", "v2", "--batch-size", "48",
                                 "--queue-size", "64", "--output-dir", str(tmp_path)))
    assert line == ("moco.py: error: --queue-size 64: MoCo v2 needs a positive multiple of the global --batch-size 48; "
                    "MoCo v3 has no queue (0)")
    config = dict(arch="resnet18", image_size=16, patch_size=16)
    common.save_checkpoint(dict(method="moco", encoder_config=config, encoder={}, args={"version": "v2"}),
                           str(tmp_path / "checkpoint.pth"))
    with pytest.raises(common.UserError, match=re.escape("is a run with other flags: --version v2 (now v3)")):
        moco.main(parse("--arch", "resnet18", "--batch-size", "16", "--workers", "0", "--output-dir", str(tmp_path)))


def test_v2_resnet_with_queue_short_run(tmp_path):
    log, checkpoint, _ = short_run("moco", V2_QUICK, tmp_path)
    random_init, trained = log[0]["knn_top1"], log[-1]["knn_top1"]
    # A plumbing run (16 steps of a ResNet-18): k-NN 0.260 -> 0.280, no collapse; the queue fills with unit keys.
    # That v2 learns is test_learning.py's (its ViT recipe, linear probe, 468 steps).
    assert trained > 0.2, (random_init, trained)
    assert all(record["momentum"] == 0.99 for record in log[1:])  # v2: fixed
    assert checkpoint["model"]["queue_ptr"] == 2 * (256 // 32) * 32 % 192  # 16 batches of 32 keys, wrapped once
    torch.testing.assert_close(checkpoint["model"]["queue"].norm(dim=1), torch.ones(192))  # unit keys
