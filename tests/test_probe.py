"""probe.py gives the known answer on features with a known structure, and runs end to end."""
import json
import os
import runpy
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import shapes
import probe
import weights
from helpers import ROOT, assert_same_step, run_script


def blobs(n_per_class, num_classes, dim, noise, seed):
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_classes, dim, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=generator), labels


def test_knn_recovers_tight_clusters():
    x, y = blobs(20, 5, 16, 0.1, 0)
    scores = common.knn_classify(x[::2], y[::2], x[1::2], k=5, temperature=0.07, num_classes=5)
    m = probe.metrics(scores, y[1::2])
    assert [m[k] for k in ("top1", "top5", "macro_f1", "balanced_accuracy")] == [100.0] * 4


def test_linear_probe_finds_a_direction_knn_cannot_see():
    # The label lives in one dimension; 63 dimensions of larger noise hide it from cosine k-NN.
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (2000,), generator=generator)
    x = torch.randn(2000, 64, generator=generator) * 3
    x[:, 0] = (2 * y - 1) + 0.1 * torch.randn(2000, generator=generator)
    args = probe.get_args_parser().parse_args(["c.pth", "--data", "shapes", "--seeds", "2", "--linear-epochs", "30",
                                               "--k", "20"])
    features = {"train": (x[:1500], y[:1500]), "val": (x[1500:], y[1500:])}
    linear, _ = probe.run_linear(features, dict(fraction=1.0), args, 2)
    knn = probe.run_knn(features, dict(fraction=1.0), args, 2)[0]["k=20"]
    assert linear["top1"] > 97 and linear["top1_std"] < 2 and len(linear["lr"]) == 2
    assert knn["top1"] < 70


def test_linear_lr_is_chosen_on_held_out_training_labels_never_on_val():
    """The lr sweep reads 10% of the TRAINING labels held out, never the val split: with the val labels
    permuted (chance accuracy at every lr) the chosen lr must not move. Selecting on val, it did."""
    x, y = blobs(60, 4, 16, 3.0, 0)  # overlapping clusters: the lr matters at 2 epochs
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    x, y = x[order], y[order]
    args = probe.get_args_parser().parse_args(["c.pth", "--data", "shapes", "--seeds", "2", "--linear-epochs", "2"])
    features = {"train": (x[:160], y[:160]), "val": (x[160:], y[160:])}
    chosen, _ = probe.run_linear(features, dict(fraction=1.0), args, 4)
    assert chosen["top1"] > 80
    for seed in range(3):
        permuted = y[160:][torch.randperm(80, generator=torch.Generator().manual_seed(seed))]
        result, _ = probe.run_linear({"train": (x[:160], y[:160]), "val": (x[160:], permuted)}, dict(fraction=1.0),
                                     args, 4)
        assert result["lr"] == chosen["lr"] and result["top1"] < 50  # the same heads, scored on nonsense labels
        assert result["temperature"] == chosen["temperature"]  # calibrated on held-out training labels too


def test_balanced_subset_keeps_each_class_share():
    labels = torch.arange(10).repeat_interleave(100)
    subset = probe.balanced_subset(labels, 3, 0.1)
    assert torch.bincount(labels[subset]).tolist() == [10] * 10
    assert not torch.equal(subset, probe.balanced_subset(labels, 4, 0.1))
    assert torch.equal(subset, probe.balanced_subset(labels, 3, 0.1))
    assert len(probe.balanced_subset(labels, 0, 0.001)) == 10  # at least one image per class
    per_class = probe.balanced_subset(labels[:250], 0, per_class=30)  # classes 0, 1: 100 images; class 2: 50
    assert torch.bincount(labels[per_class]).tolist() == [30, 30, 30]
    assert len(probe.balanced_subset(labels[:250], 0, per_class=80)) == 80 + 80 + 50  # all of a smaller class


def test_metrics_on_a_hand_computed_case():
    labels = torch.tensor([0, 0, 1, 2])
    scores = torch.tensor([[3.0, 2, 1], [1, 3, 2], [1, 3, 2], [3, 1, 2]])  # predicts 0, 1, 1, 0
    m = probe.metrics(scores, labels)
    assert m["top1"] == 50 and m["top5"] == 100
    # F1: class 0 = 2·1/(2+2) = 0.5, class 1 = 2·1/(2+1) = 2/3, class 2 = 0
    assert abs(m["macro_f1"] - 100 * (0.5 + 2 / 3 + 0) / 3) < 1e-4
    # recall 1/2, 1, 0: balanced accuracy 50%; precision 1/2, 1/2, none predicted
    assert m["balanced_accuracy"] == pytest.approx(50) and m["per_class"]["recall"] == [0.5, 1.0, 0.0]
    assert m["per_class"]["precision"] == [0.5, 0.5, None]
    assert probe.metrics(scores, labels, confusion=True)["per_class"]["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_calibration_error_is_zero_when_calibrated_and_temperature_scaling_repairs_overconfidence():
    """2 classes, the top probability c ~ U(0.5, 1) and right with probability c: calibrated, ECE ≈ 0. The same
    logits ×4 are over-confident (ECE > 10%); the temperature fitted on another sample brings it back (T ≈ 4)."""
    generator = torch.Generator().manual_seed(0)
    def sample(n):
        confidence = 0.5 + 0.5 * torch.rand(n, generator=generator)
        logits = torch.stack([torch.log(confidence), torch.log(1 - confidence)], 1)  # predicts class 0
        labels = (torch.rand(n, generator=generator) > confidence).long()  # class 0 with probability c
        return logits, labels
    logits, labels = sample(200_000)
    assert probe.expected_calibration_error(logits, labels) < 0.5
    assert probe.expected_calibration_error(4 * logits, labels) > 10
    temperature = probe.fit_temperature(*(lambda l, y: (4 * l, y))(*sample(20_000)))
    assert temperature == pytest.approx(4, rel=0.1)
    assert probe.expected_calibration_error(4 * logits, labels, temperature) < 1


def test_probe_all_protocols_on_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    encoder = common.build_encoder("vit_nano", 16, 8)
    config = dict(arch="vit_nano", image_size=16, patch_size=8)
    common.save_checkpoint(dict(method="simclr", encoder_config=config, encoder=encoder.state_dict(), args={}),
                           str(tmp_path / "c.pth"))
    result = run_script("probe.py", str(tmp_path / "c.pth"), "--data", "shapes:16:200", "--protocol", "all",
                        "--seeds", "2", "--linear-epochs", "5", "--finetune-epochs", "1", "--finetune-batch-size", "32",
                        "--workers", "0", "--trainable-blocks", "1", "--k", "5", "20")
    assert result.returncode == 0, result.stderr
    results = json.load(open(tmp_path / "probe_shapes_16_200_knn+linear+finetune_labels1.json"))
    assert set(results["knn"]) == {"k=5", "k=20"}
    for protocol in (results["knn"]["k=20"], results["linear"], results["finetune"]):
        assert 0 <= protocol["top1"] <= protocol["top5"] <= 100
    assert "top1_std" in results["linear"] and "finetune" in result.stdout


def test_probe_plain_torchvision_state_dict(tmp_path):
    model = common.build_encoder("resnet18", 16)
    # a classifier is dropped
    state = {**model.state_dict(), "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}
    torch.save(state, tmp_path / "r18.pth")
    result = run_script("probe.py", str(tmp_path / "r18.pth"), "--arch", "resnet18", "--data", "shapes:16:100",
                        "--protocol", "knn", "--workers", "0", "--output", str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stderr
    # 10 images per class: k = 20, 100, 200 skipped
    assert set(json.load(open(tmp_path / "out.json"))["knn"]) == {"k=10"}


def test_finetune_groups_follow_mae_layer_decay():
    # MAE's util/lr_decay.py: with H = depth + 1, layer i trains at lr × decay^(H − i); the patch
    # embedding, CLS and positions are layer 0, block j is layer j + 1, the final norm and the head H.
    encoder = common.build_encoder("vit_nano", 16, 8)  # 4 blocks: H = 5
    head = torch.nn.Linear(128, 10)
    groups = probe.finetune_param_groups(encoder, head, layer_decay=0.5, weight_decay=0.05)
    scale = {id(p): g["scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(encoder.patch_embed.proj.weight)] == scale[id(encoder.cls_token)] == 0.5 ** 5
    assert (scale[id(encoder.blocks[0].attn.qkv.weight)] == 0.5 ** 4
            and scale[id(encoder.blocks[3].mlp.fc2.weight)] == 0.5)
    assert scale[id(encoder.norm.weight)] == scale[id(head.weight)] == 1.0
    assert decay[id(head.weight)] == decay[id(encoder.blocks[2].attn.proj.weight)] == 0.05
    assert all(decay[id(p)] == 0 for p in (head.bias, encoder.norm.weight, encoder.cls_token, encoder.pos_embed))
    # --trainable-blocks 1: the last block, the final norm and the head train; everything else is frozen.
    groups = probe.finetune_param_groups(encoder, head, 0.5, 0.05, trainable_blocks=1)
    trainable = {id(p) for g in groups for p in g["params"]}
    assert trainable == {id(p) for p in [*encoder.blocks[3].parameters(), *encoder.norm.parameters(),
                                         *head.parameters()]}
    assert not encoder.blocks[2].attn.qkv.weight.requires_grad


def save_checkpoint(path, arch="vit_nano", seed=0):
    torch.manual_seed(seed)
    config = dict(arch=arch, image_size=16, patch_size=8)
    common.save_checkpoint(dict(method="simclr", encoder_config=config,
                                encoder=common.build_encoder(**config).state_dict(), args={}), str(path))
    return str(path)


def test_finetune_step_under_ddp_equals_one_process(tmp_path):
    saved_argv, sys.argv = sys.argv, ["tests/probe_ddp_step.py", str(tmp_path / "single.pt")]
    try:  # the one-process side in this interpreter
        runpy.run_path(os.path.join(ROOT, "tests", "probe_ddp_step.py"), run_name="__main__")
    finally:
        sys.argv = saved_argv
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/probe_ddp_step.py",
                        str(tmp_path / "ddp.pt"), threads=1)
    assert result.returncode == 0, result.stderr
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    assert_same_step(single, ddp)
    assert single["grads"]["head.0.weight"].abs().sum() > 0  # fc_norm trains; the dropped final norm is gone
    assert "encoder.norm.weight" not in single["grads"]
    for name, param in single["params"].items():
        torch.testing.assert_close(ddp["params"][name], param, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


TWO_RANKS_FLAGS = ["--data", "shapes:16:120:30", "--protocol", "knn", "linear", "--seeds", "1", "--linear-epochs",
                   "3", "--k", "5", "20", "--batch-size", "16", "--workers", "0"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """tests/probe_ranks.py on 2 gloo ranks (probe.main with TWO_RANKS_FLAGS first), once for the four tests below:
    its folder, its stdout, and what each rank saved."""
    tmp = tmp_path_factory.mktemp("ranks")
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/probe_ranks.py",
                        save_checkpoint(tmp / "c.pth"), str(tmp / "out"), *TWO_RANKS_FLAGS, threads=1)
    assert result.returncode == 0, result.stderr
    return tmp, result.stdout, [torch.load(tmp / f"out.rank{rank}") for rank in range(2)]


def test_knn_and_linear_under_torchrun_equal_one_process(two_ranks, tmp_path):
    folder, stdout, _ = two_ranks
    single = probe.main(probe.get_args_parser().parse_args([str(folder / "c.pth"), *TWO_RANKS_FLAGS,
                                                            "--output", str(tmp_path / "single.json")]))
    ddp = json.load(open(folder / "out.json"))
    assert ddp["settings"]["world_size"] == 2 and stdout.count("k-NN k=5") == 1  # rank 0 alone reports
    assert ddp["knn"] == single["knn"] and ddp["linear"]["lr"] == single["linear"]["lr"]
    assert ddp["linear"]["temperature"] == single["linear"]["temperature"]
    assert all(abs(ddp["linear"][key] - value) < 1e-5 for key, value in single["linear"].items()
               if key not in ("lr", "temperature", "per_class_seed0", "seeds"))
    assert ddp["linear"]["per_class_seed0"]["confusion"] == single["linear"]["per_class_seed0"]["confusion"]


def test_key_gather_of_channels_last_images_is_the_global_batch_in_channels_last(two_ranks):
    batch = torch.arange(48.0).view(4, 3, 2, 2)
    for rank in two_ranks[-1]:
        assert torch.equal(rank["gathered"], batch)
        assert rank["gathered"].is_contiguous(memory_format=torch.channels_last)


def test_ranks_draw_their_own_views_from_the_same_initial_weights(two_ranks):
    """Of one image repeated, each rank's first batch differs from the other's: crops, flips, RandAugment, erasing
    and MixUp / CutMix (fine-tuning), crops and flips (linear --augment); yet both built the same weights."""
    rank0, rank1 = two_ranks[-1]
    for key in "finetune_images", "linear_images":
        assert not torch.equal(rank0[key], rank1[key]), key
    for name, weight in rank0["built"].items():
        assert torch.equal(rank1["built"][name], weight), name


def test_no_rank_waits_in_a_collective_while_rank_0_plots(two_ranks):
    assert two_ranks[-1][0]["plotted"]  # rank 1 had left probe.main by then: no collective held it


def test_baselines_show_that_pretraining_helped(tmp_path, capsys):
    # A "pre-trained" encoder with known-good features: 150 supervised steps on 400 shapes images.
    torch.manual_seed(0)
    data = common.build_dataset("shapes:16:400", "train", common.eval_transform(16))
    x, y = torch.stack([data[i][0] for i in range(len(data))]), torch.tensor(weights.labels_of(data))
    encoder = common.build_encoder("vit_nano", 16, 8)
    model = torch.nn.Sequential(encoder, torch.nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    for step in range(150):
        batch = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[batch].flip(3) if step % 2 else x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    config = dict(arch="vit_nano", image_size=16, patch_size=8)
    common.save_checkpoint(dict(method="supervised", encoder_config=config, encoder=encoder.state_dict(), args={}),
                           str(tmp_path / "c.pth"))
    results = probe.main(probe.get_args_parser().parse_args([
        str(tmp_path / "c.pth"), "--data", "shapes:16:400:400", "--protocol", "knn", "linear", "--baselines",
        "--seeds", "2", "--linear-epochs", "10", "--k", "20", "--workers", "0"]))
    out = capsys.readouterr().out
    print(out)
    assert "\nrandom init  (" in out and "difference k=20" in out and "linear, CLS, cached (MAE §A.2)" in out
    # random init: 32.5% k-NN, 26% linear; the supervised encoder: 41% and 39% (400 val images: ±2.5%)
    assert results["difference"]["knn"]["k=20"]["top1"] > 4 and results["difference"]["linear"]["top1"] > 6
    assert results["difference"]["linear"]["top1"] == pytest.approx(results["linear"]["top1"]
                                                                    - results["baselines"]["linear"]["top1"])
    saved = json.load(open(tmp_path / "probe_shapes_16_400_400_knn+linear_labels1.json"))
    assert (saved["settings"]["baselines"] and saved["settings"]["protocol"] == ["knn", "linear"]
            and saved["settings"]["k"] == [20])


def test_dino_readouts_concatenate_normalised_tokens():
    torch.manual_seed(0)
    encoder = common.build_encoder("vit_nano", 16, 8).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        # (B, 1 + L, D)
        x = torch.cat([(encoder.cls_token + encoder.pos_embed[:, :1]).expand(3, -1, -1), encoder.embed(images)], 1)
        outputs = []
        for block in encoder.blocks:
            x = block(x)
            outputs.append(encoder.norm(x))  # DINO's get_intermediate_layers: each through the final norm
        last4 = weights.Readout(encoder, n_last_blocks=4)(images)
        avgpool = weights.Readout(encoder, avgpool=True)(images)
        torch.testing.assert_close(weights.Readout(encoder)(images), encoder(images))
    torch.testing.assert_close(last4, torch.cat([t[:, 0] for t in outputs], 1))
    torch.testing.assert_close(avgpool, torch.cat([outputs[-1][:, 0], outputs[-1][:, 1:].mean(1)], 1))
    assert (weights.Readout(encoder, 4).dim == last4.shape[1] == 4 * 128
            and weights.Readout(encoder, avgpool=True).dim == 256)


def test_mae_classifier_pools_patch_tokens_through_fc_norm():
    torch.manual_seed(0)
    model = weights.Classifier(common.build_encoder("vit_nano", 16, 8), 10, global_pool=True)
    assert isinstance(model.encoder.norm, torch.nn.Identity) and isinstance(model.head[0], torch.nn.LayerNorm)
    assert model.head[1].weight.std() < 1e-4 and not model.head[1].bias.any()  # MAE: trunc_normal std 2e-5
    images = torch.randn(2, 3, 16, 16)
    tokens = model.encoder.forward_tokens(model.encoder.embed(images))
    torch.testing.assert_close(model(images), model.head(tokens[:, 1:].mean(1)))
    groups = probe.finetune_param_groups(model.encoder, model.head, 0.75, 0.05)
    head_group = {id(p): g for g in groups for p in g["params"]}
    assert (head_group[id(model.head[0].weight)]["scale"] == 1
            and head_group[id(model.head[0].weight)]["weight_decay"] == 0)
    pixels = probe.get_args_parser().parse_args(["c.pth", "--data", "shapes"])
    vars(pixels).update(mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD, flip=True, color=True, vflip=False,
                        rot90=False)  # what load_encoder sets for a run with the default views
    transform = probe.train_augmentation(16, pixels, rand_augment=True)  # the MAE fine-tuning recipe's views
    names = [type(t).__name__ for t in transform.transforms]
    assert "RandAugment" in names and names[-1] == "RandomErasing" and transform.transforms[-1].p == 0.25
    rand_augment = transform.transforms[names.index("RandAugment")]
    assert (rand_augment.num_ops, rand_augment.magnitude) == (2, 9)
    assert transform(shapes.Shapes("train", 16, 1)[0][0]).shape == (3, 16, 16)


def test_finetune_step_smooths_the_labels():
    """Label smoothing 0.1 (MAE): the target is 0.9 × the label (one-hot, or MixUp/CutMix's soft mix) + 0.1/C."""
    torch.manual_seed(0)
    model, C = torch.nn.Linear(6, 5), 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step moves nothing: the loss is of these weights
    images, labels = torch.randn(4, 6), torch.tensor([0, 3, 3, 1])
    soft = torch.softmax(torch.randn(4, C), dim=1)
    for targets, dense in ((labels, torch.nn.functional.one_hot(labels, C).float()), (soft, soft)):
        log_p = torch.log_softmax(model(images), dim=1)
        expected = -((0.9 * dense + 0.1 / C) * log_p).sum(1).mean()
        torch.testing.assert_close(probe.finetune_step(model, optimizer, images, targets), expected.detach())


def tone_folder(root, train_per_class=20, val_per_class=10):
    """Known structure: an ImageFolder of 16 px noisy images, dark or light by class. Any encoder separates
    them, a random one too: a probe must score 100% on val."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, tone in (("dark", 60), ("light", 190)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(tone + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return str(root)


def test_linear_augment_and_label_fraction_end_to_end(tmp_path, monkeypatch):
    """--label-fraction 0.5 keeps 10 of each class's 20 training labels, for k-NN and for the linear probe (its
    lr sweep too); --augment trains the final head on augmented views (pad-and-crop + flip at 16 px) through the
    frozen encoder, not on the cached centre crops; on dark vs light images both score 100%."""
    data, checkpoint = tone_folder(tmp_path / "tones"), save_checkpoint(tmp_path / "c.pth")
    fits, real_train = [], probe.train_linear

    def recording_train(batches, *args, **kwargs):  # keeps what each fit trains on in its first epoch
        first_epoch = []
        fits.append(first_epoch)

        def watched(epoch):
            for x, y in batches(epoch):
                if epoch == 0:
                    first_epoch.append((x.clone(), y.clone()))
                yield x, y
        return real_train(watched, *args, **kwargs)
    monkeypatch.setattr(probe, "train_linear", recording_train)
    flags = ["--protocol", "knn", "linear", "--augment", "--label-fraction", "0.5", "--seeds", "1",
             "--linear-epochs", "3", "--k", "5", "15", "--workers", "0", "--output", str(tmp_path / "r.json")]
    results = probe.main(probe.get_args_parser().parse_args([checkpoint, "--data", data, *flags]))
    assert set(results["knn"]) == {"k=5"}  # k = 15 is above the 10 labelled images per class: skipped
    assert results["knn"]["k=5"]["top1"] == results["linear"]["top1"] == 100
    assert len(fits) == 6 + 1  # 6 candidate lrs on cached features, then the final head
    for fit in fits[:6]:  # trained on 9 + 9 of the 10 + 10 labelled images (1 a class held out to choose the lr)
        assert torch.bincount(torch.cat([y for _, y in fit])).tolist() == [9, 9]
    encoder, _ = weights.load_encoder(probe.get_args_parser().parse_args([checkpoint, "--data", data]))
    train_set = common.build_dataset(data, "train", common.eval_transform(16))
    with torch.no_grad():  # (40, D): every training image's cached feature
        cached = encoder.eval()(torch.stack([train_set[i][0] for i in range(len(train_set))]))
    final = torch.cat([x for x, _ in fits[6]])
    is_cached = [bool(((cached - row).abs().amax(1) < 1e-4).any()) for row in final]
    assert sum(is_cached) < len(final) / 2, is_cached  # augmented views (a crop equals the centre one 1 time in 50)
    assert len(final) == 16  # 2 batches of 8 of the 20 labelled images (the last, partial batch dropped)


def test_finetune_recipes_layer_decay_and_scratch_baseline_end_to_end(tmp_path, monkeypatch):
    """Fine-tuning as the loop runs it, 2 epochs on dark vs light images. The MAE recipe (a ViT's default): at every
    step each parameter's lr is the schedule's × decay^(H − i) (H = 5 for 4 blocks), the targets are MixUp/CutMix
    mixes, the weights start from the checkpoint. --baselines: from a random init, layer decay off (every lr the
    schedule's). --recipe plain on the same ViT: the CLS token through the final norm, plain labels.
    --label-fraction 0.5: 2 batches of 8 of the 20 labelled images an epoch."""
    data = tone_folder(tmp_path / "tones")
    checkpoint = save_checkpoint(tmp_path / "c.pth", seed=7)  # not the scratch baseline's init (seed 0)
    steps, real_step = [], probe.finetune_step

    def recording_step(model, optimizer, images, targets):
        lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        steps.append(dict(lr={n: lr_of[id(p)] for n, p in model.named_parameters() if id(p) in lr_of},
                          images=len(images), targets=targets.clone(), final_norm=type(model.encoder.norm),
                          patch=model.encoder.patch_embed.proj.weight.detach().clone()))
        return real_step(model, optimizer, images, targets)
    monkeypatch.setattr(probe, "finetune_step", recording_step)
    flags = [checkpoint, "--data", data, "--protocol", "finetune", "--seeds", "1", "--finetune-epochs", "2",
             "--finetune-warmup-epochs", "0", "--layer-decay", "0.5", "--label-fraction", "0.5", "--workers", "0"]
    probe.main(probe.get_args_parser().parse_args(flags + ["--baselines", "--output", str(tmp_path / "mae.json")]))
    assert len(steps) == 2 * 4 and all(step["images"] == 8 for step in steps)  # from the checkpoint, then from scratch

    def depth(name):  # MAE's util/lr_decay.py: stem 0, block j at j + 1, the head (and the final norm) at H = 5
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        return 5 if name.startswith("head.") else 0
    lr = 5e-4 * 8 / 256
    saved = torch.load(checkpoint, weights_only=False)["encoder"]["patch_embed.proj.weight"]
    for s, step in enumerate(steps[:4]):
        scheduled = common.cosine_schedule(s, 4, lr, 1e-6)
        assert step["lr"] == pytest.approx({name: scheduled * 0.5 ** (5 - depth(name)) for name in step["lr"]})
        targets = step["targets"]  # soft: (B, C) rows that sum to 1
        assert targets.shape == (8, 2) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert any(step["targets"].amax(1).min() < 0.99 for step in steps[:4])  # mixed, not one-hot
    assert torch.equal(steps[0]["patch"], saved)
    assert steps[0]["final_norm"] is torch.nn.Identity  # global pool: fc_norm replaces the final norm
    for s, step in enumerate(steps[4:]):  # from scratch: a random init, and one lr for every layer
        assert list(step["lr"].values()) == pytest.approx([common.cosine_schedule(s, 4, lr, 1e-6)] * len(step["lr"]))
    assert not torch.equal(steps[4]["patch"], saved)

    steps.clear()
    probe.main(probe.get_args_parser().parse_args(flags + ["--recipe", "plain", "--output", str(tmp_path / "p.json")]))
    assert len(steps) == 4 and all(step["final_norm"] is torch.nn.LayerNorm for step in steps)  # the CLS token, normed
    assert all(step["targets"].dtype == torch.long and step["targets"].shape == (8,) for step in steps)  # no mixing


def test_batches_are_capped_at_the_labelled_set():
    assert probe.global_batch(None, 1_281_167, 8) == 1024  # ImageNet: DINO's / MAE's batch
    assert probe.global_batch(None, 256, 1) == 25  # an epoch of 10 steps, not one
    assert probe.global_batch(1024, 256, 1) == 256 and probe.global_batch(None, 256, 2) == 24  # a multiple of the ranks
    assert probe.global_batch(None, 20, 1) == 8


def test_224px_resnet_state_dict_on_32px_data_keeps_its_stem(tmp_path, capsys):
    import torchvision
    model = torchvision.models.resnet18()  # the 7x7/2 stem and max-pool of an ImageNet checkpoint
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    results = probe.main(probe.get_args_parser().parse_args([str(tmp_path / "r18.pth"), "--arch", "resnet18",
                                                             "--data", "shapes:32:60", "--protocol", "knn",
                                                             "--k", "10", "100", "--workers", "0"]))
    # k = 100 > 60 training images: skipped, with a note (k = 10 > 6 per class: kept, the smallest)
    assert set(results["knn"]) == {"k=10"}
    assert "skipped" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "probe_shapes_32_60_knn_labels1.json")


def test_plot_of_the_features_and_the_confusion_matrix(tmp_path):
    """--plot: the PCA map alone after k-NN; beside it the confusion matrix once a head is trained."""
    pytest.importorskip("matplotlib")
    checkpoint = save_checkpoint(tmp_path / "c.pth")
    sizes = []
    for protocols in (["knn"], ["knn", "linear"]):
        probe.main(probe.get_args_parser().parse_args([checkpoint, "--data", "shapes:16:40", "--protocol", *protocols,
                                                       "--plot", "pca", "--seeds", "1", "--linear-epochs", "2",
                                                       "--workers", "0", "--output", str(tmp_path / "r.json")]))
        sizes.append(Image.open(tmp_path / "r_pca.png").size)  # (width, height)
    assert sizes[0][0] < 1.3 * sizes[0][1] and sizes[1][0] > 1.6 * sizes[1][1]  # one panel, then two


def shapes_folder(root, test_from):
    """root/{train,val}/<class>/ from the built-in shapes (200 + 100 images), and root/test/<class>/: a copy of
    test_from's images (val or train)."""
    for split, count in (("train", 200), ("val", 100)):
        data = shapes.Shapes(split, 16, count)
        for i in range(count):
            image, label = data[i]
            for folder in (split, "test") if split == test_from else (split,):
                (root / folder / str(label)).mkdir(parents=True, exist_ok=True)
                image.save(root / folder / str(label) / f"{i}.png")
    return str(root)


def test_the_test_split_is_scored_apart_and_never_chooses(tmp_path, capsys):
    """A test/ split is scored by the heads and models val reports (k-NN: at the k val chose), printed apart at the
    end, and never read for a choice. With test/ a copy of val its numbers are val's. With test/ a copy of the
    training images every val number, lr, temperature and chosen k stay as they were."""
    checkpoint = save_checkpoint(tmp_path / "c.pth")
    flags = ["--protocol", "knn", "linear", "finetune", "--seeds", "2", "--linear-epochs", "3", "--finetune-epochs",
             "1", "--finetune-base-lr", "5e-3", "--k", "1", "20", "--workers", "0"]
    runs = {}
    for test_from in ("val", "train"):
        data = shapes_folder(tmp_path / test_from, test_from)
        runs[test_from] = probe.main(probe.get_args_parser().parse_args([checkpoint, "--data", data, *flags, "--output",
                                                                         str(tmp_path / f"{test_from}.json")]))
    out = capsys.readouterr().out
    assert out.count("test split (scored once") == 2 and out.rindex("test split") > out.rindex("  fine-tune, MAE")
    copy, other = runs["val"], runs["train"]
    assert copy["val"] == other["val"]  # every val number, lr and temperature
    copy_test, other_test = (run["test"][checkpoint]["100% labels"] for run in runs.values())
    best = max(copy["knn"], key=lambda k: copy["knn"][k]["top1"])
    assert copy_test["knn"]["k"] == other_test["knn"]["k"] == best
    assert {k: v for k, v in copy_test["knn"].items() if k != "k"} == copy["knn"][best]
    for protocol in ("linear", "finetune"):  # the same heads and models, scored on the same images
        assert {k: v for k, v in copy_test[protocol].items()} == {k: v for k, v in copy[protocol].items()
                                                                  if k not in ("lr", "temperature")}
    assert other_test["linear"]["top1"] > copy_test["linear"]["top1"]  # scored on test/: the head's training images


def test_knn_scores_test_at_the_k_val_chose():
    """Mislabelled training points: on val (fresh points) k = 20 outvotes them and k = 1 does not; on a test split of
    the mislabelled points themselves k = 1 scores 100% (each is its own neighbour), k = 20 0%. Test is scored at
    val's k."""
    x, y = blobs(50, 4, 16, 1.0, 0)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    noisy = y.clone()
    noisy[:150:8] = (noisy[:150:8] + 1) % 4  # 1 in 8 training labels wrong
    args = probe.get_args_parser().parse_args(["c.pth", "--data", "shapes", "--k", "1", "20"])
    features = {"train": (x[:150], noisy[:150]), "val": (x[150:], y[150:]), "test": (x[:150:8], noisy[:150:8])}
    val, test = probe.run_knn(features, dict(fraction=1.0), args, 4)
    assert val["k=20"]["top1"] == 100 > val["k=1"]["top1"]
    assert test["k"] == "k=20" and test["top1"] == 0  # k = 1 would have scored 100


def test_compare_runs_every_backbone_on_the_same_label_subsets_at_each_budget(tmp_path, capsys):
    """--compare: the same protocols, label subsets and seeds for every backbone. Two files with the checkpoint's
    weights (one a plain state_dict whose patch size 8 comes from the file) differ from it by exactly 0 at every
    budget, seed by seed: any difference in subsets or seeds would show. Another encoder differs, and its reported
    difference is the checkpoint's minus its own, seed by seed. The curve: a row per budget."""
    checkpoint = save_checkpoint(tmp_path / "c.pth")
    torch.save(torch.load(checkpoint, weights_only=False)["encoder"], tmp_path / "plain.pth")
    shutil.copy(checkpoint, tmp_path / "copy.pth")
    other_encoder = save_checkpoint(tmp_path / "other.pth", seed=5)
    others = [f"{tmp_path / 'plain.pth'}:vit_nano", str(tmp_path / "copy.pth")]
    results = probe.main(probe.get_args_parser().parse_args([
        checkpoint, "--data", "shapes:16:200:100", "--protocol", "knn", "linear", "--compare", *others, other_encoder,
        "--label-fraction", "0.2", "1", "--labels-per-class", "5", "--seeds", "2", "--linear-epochs", "3", "--k", "5",
        "--workers", "0", "--output", str(tmp_path / "r.json")]))
    out = capsys.readouterr().out
    budgets = ["20% labels", "100% labels", "5 labels a class"]
    assert list(results["val"]) == [checkpoint, *others, other_encoder]
    assert list(results["val"][checkpoint]) == budgets
    for labels in budgets:
        assert out.count(f"linear, CLS, cached (MAE §A.2), {labels} ") == 4  # a row per backbone and budget
        mine, theirs = results["val"][checkpoint][labels]["linear"], results["val"][other_encoder][labels]["linear"]
        paired = [a["top1"] - b["top1"] for a, b in zip(mine["seeds"], theirs["seeds"])]
        delta = results["difference_from"][other_encoder][labels]["linear"]
        assert delta["top1"] == pytest.approx(sum(paired) / 2) and delta["top1_std"] == pytest.approx(
            abs(paired[0] - paired[1]) / 2 ** 0.5) and paired != [0, 0]
        for other in others:
            delta = results["difference_from"][other][labels]
            assert delta["linear"]["top1"] == delta["linear"]["top1_std"] == delta["knn"]["k=5"]["top1"] == 0
    assert [len(results["val"][checkpoint][labels]["knn"]["k=5"]["seeds"]) for labels in budgets] == [2, 1, 2]
    assert out.count("→ pre-training is +0.00 points from") == 2 * 3 * 2  # the reading, per protocol and budget


def test_freeze_epochs_train_the_head_alone_first(tmp_path, monkeypatch):
    """--freeze-epochs 1: an epoch of the head alone (the encoder out of the optimizer, its weights as loaded), on its
    own cosine without warm-up; then the fine-tuning of every block, its warm-up and cosine from the start."""
    data, checkpoint = tone_folder(tmp_path / "tones"), save_checkpoint(tmp_path / "c.pth", seed=7)
    steps, real_step = [], probe.finetune_step

    def recording_step(model, optimizer, images, targets):
        lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        steps.append(dict(lr={n: lr_of[id(p)] for n, p in model.named_parameters() if id(p) in lr_of},
                          patch=model.encoder.patch_embed.proj.weight.detach().clone()))
        return real_step(model, optimizer, images, targets)
    monkeypatch.setattr(probe, "finetune_step", recording_step)
    probe.main(probe.get_args_parser().parse_args([
        checkpoint, "--data", data, "--protocol", "finetune", "--seeds", "1", "--freeze-epochs", "1",
        "--finetune-epochs", "2", "--finetune-warmup-epochs", "1", "--layer-decay", "1", "--label-fraction", "0.5",
        "--workers", "0", "--output", str(tmp_path / "r.json")]))
    saved = torch.load(checkpoint, weights_only=False)["encoder"]["patch_embed.proj.weight"]
    lr = 5e-4 * 8 / 256
    assert len(steps) == 2 + 4  # 2 steps an epoch
    for s, step in enumerate(steps[:2]):  # the head alone: fc_norm and the linear layer
        assert set(step["lr"]) == {"head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias"}
        assert list(step["lr"].values()) == pytest.approx([common.cosine_schedule(s, 2, lr, 1e-6)] * 4)
        assert torch.equal(step["patch"], saved)
    assert torch.equal(steps[2]["patch"], saved)  # untouched until the blocks train
    for s, step in enumerate(steps[2:]):
        assert "encoder.patch_embed.proj.weight" in step["lr"] and len(step["lr"]) > 4
        assert list(step["lr"].values())[0] == pytest.approx(common.cosine_schedule(s, 4, lr, 1e-6, 2))
    assert not torch.equal(steps[-1]["patch"], saved)
