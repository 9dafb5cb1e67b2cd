"""probe.py gives the known answer on features with a known structure, and runs end to end."""
import json
import os
import runpy
import sys

import torch

import common
import probe
from helpers import ROOT, assert_same_step, run_script


def blobs(n_per_class, num_classes, dim, noise, seed):
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_classes, dim, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=generator), labels


def test_knn_recovers_tight_clusters():
    x, y = blobs(20, 5, 16, 0.1, 0)
    scores = probe.knn_classify(x[::2], y[::2], x[1::2], k=5, temperature=0.07, num_classes=5)
    assert probe.metrics(scores, y[1::2]) == {"top1": 100.0, "top5": 100.0, "macro_f1": 100.0}


def test_linear_probe_finds_a_direction_knn_cannot_see():
    # The label lives in one dimension; 63 dimensions of larger noise hide it from cosine k-NN.
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (2000,), generator=generator)
    x = torch.randn(2000, 64, generator=generator) * 3
    x[:, 0] = (2 * y - 1) + 0.1 * torch.randn(2000, generator=generator)
    args = probe.get_args_parser().parse_args(["c.pth", "--data", "shapes", "--seeds", "2", "--linear-epochs", "30", "--k", "20"])
    linear = probe.run_linear(x[:1500], y[:1500], x[1500:], y[1500:], args, 2)
    knn = probe.run_knn(x[:1500], y[:1500], x[1500:], y[1500:], args, 2)["k=20"]
    assert linear["top1"] > 97 and linear["top1_std"] < 2 and len(linear["lr"]) == 2
    assert knn["top1"] < 70


def test_balanced_subset_keeps_each_class_share():
    labels = torch.arange(10).repeat_interleave(100)
    subset = probe.balanced_subset(labels, 0.1, seed=3)
    assert torch.bincount(labels[subset]).tolist() == [10] * 10
    assert not torch.equal(subset, probe.balanced_subset(labels, 0.1, seed=4))
    assert torch.equal(subset, probe.balanced_subset(labels, 0.1, seed=3))
    assert len(probe.balanced_subset(labels, 0.001, seed=0)) == 10  # at least one image per class


def test_metrics_on_a_hand_computed_case():
    labels = torch.tensor([0, 0, 1, 2])
    scores = torch.tensor([[3.0, 2, 1], [1, 3, 2], [1, 3, 2], [3, 1, 2]])  # predicts 0, 1, 1, 0
    m = probe.metrics(scores, labels)
    assert m["top1"] == 50 and m["top5"] == 100
    # F1: class 0 = 2·1/(2+2) = 0.5, class 1 = 2·1/(2+1) = 2/3, class 2 = 0
    assert abs(m["macro_f1"] - 100 * (0.5 + 2 / 3 + 0) / 3) < 1e-4


def test_probe_all_protocols_on_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    encoder = common.build_encoder("vit_nano", 16, 8)
    config = dict(arch="vit_nano", image_size=16, patch_size=8)
    common.save_checkpoint(dict(method="simclr", encoder_config=config, encoder=encoder.state_dict(), args={}), str(tmp_path / "c.pth"))
    result = run_script("probe.py", str(tmp_path / "c.pth"), "--data", "shapes:16:200", "--protocol", "all", "--seeds", "2",
                        "--linear-epochs", "5", "--finetune-epochs", "1", "--finetune-batch-size", "32", "--workers", "0",
                        "--trainable-blocks", "1", "--k", "5", "20")
    assert result.returncode == 0, result.stderr
    results = json.load(open(tmp_path / "probe_shapes_16_200_knn+linear+finetune_labels1.json"))
    assert set(results["knn"]) == {"k=5", "k=20"}
    for protocol in (results["knn"]["k=20"], results["linear"], results["finetune"]):
        assert 0 <= protocol["top1"] <= protocol["top5"] <= 100
    assert "top1_std" in results["linear"] and "finetune" in result.stdout


def test_probe_plain_torchvision_state_dict(tmp_path):
    model = common.build_encoder("resnet18", 16)
    state = {**model.state_dict(), "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}  # a classifier is dropped
    torch.save(state, tmp_path / "r18.pth")
    result = run_script("probe.py", str(tmp_path / "r18.pth"), "--arch", "resnet18", "--data", "shapes:16:100",
                        "--protocol", "knn", "--workers", "0", "--output", str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stderr
    assert "k=20" in json.load(open(tmp_path / "out.json"))["knn"]


def test_finetune_groups_follow_mae_layer_decay():
    # MAE's util/lr_decay.py: with H = depth + 1, layer i trains at lr × decay^(H − i); the patch
    # embedding, CLS and positions are layer 0, block j is layer j + 1, the final norm and the head H.
    encoder = common.build_encoder("vit_nano", 16, 8)  # 4 blocks: H = 5
    head = torch.nn.Linear(128, 10)
    groups = probe.finetune_param_groups(encoder, head, layer_decay=0.5, weight_decay=0.05)
    scale = {id(p): g["scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(encoder.patch_embed.proj.weight)] == scale[id(encoder.cls_token)] == 0.5 ** 5
    assert scale[id(encoder.blocks[0].attn.qkv.weight)] == 0.5 ** 4 and scale[id(encoder.blocks[3].mlp.fc2.weight)] == 0.5
    assert scale[id(encoder.norm.weight)] == scale[id(head.weight)] == 1.0
    assert decay[id(head.weight)] == decay[id(encoder.blocks[2].attn.proj.weight)] == 0.05
    assert all(decay[id(p)] == 0 for p in (head.bias, encoder.norm.weight, encoder.cls_token, encoder.pos_embed))
    # --trainable-blocks 1: the last block, the final norm and the head train; everything else is frozen.
    groups = probe.finetune_param_groups(encoder, head, 0.5, 0.05, trainable_blocks=1)
    trainable = {id(p) for g in groups for p in g["params"]}
    assert trainable == {id(p) for p in [*encoder.blocks[3].parameters(), *encoder.norm.parameters(), *head.parameters()]}
    assert not encoder.blocks[2].attn.qkv.weight.requires_grad


def save_checkpoint(path, arch="vit_nano", seed=0):
    torch.manual_seed(seed)
    config = dict(arch=arch, image_size=16, patch_size=8)
    common.save_checkpoint(dict(method="simclr", encoder_config=config, encoder=common.build_encoder(**config).state_dict(), args={}), str(path))
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


def test_knn_and_linear_under_torchrun_equal_one_process(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "c.pth")
    flags = ["--data", "shapes:16:120:30", "--protocol", "knn", "linear", "--seeds", "1", "--linear-epochs", "3",
             "--k", "5", "20", "--batch-size", "16", "--workers", "0"]
    single = probe.main(probe.get_args_parser().parse_args([checkpoint, *flags, "--output", str(tmp_path / "single.json")]))
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "probe.py", checkpoint, *flags,
                        "--output", str(tmp_path / "ddp.json"), threads=1)
    assert result.returncode == 0, result.stderr
    ddp = json.load(open(tmp_path / "ddp.json"))
    assert ddp["settings"]["world_size"] == 2 and result.stdout.count("k-NN k=5") == 1  # rank 0 alone reports
    assert ddp["knn"] == single["knn"] and ddp["linear"]["lr"] == single["linear"]["lr"]
    assert all(abs(ddp["linear"][key] - value) < 1e-5 for key, value in single["linear"].items() if key != "lr")
