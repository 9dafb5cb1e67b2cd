"""A diverged, pre-empted or mis-launched run never costs the last good checkpoint, and never lies."""
import importlib
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import device_views
import shapes
import simclr
from helpers import assert_same_state, run_script
from test_errors import user_error

METHODS = ["simclr", "moco", "byol", "simsiam", "mae", "dino"]
RUN = ["--data", "shapes:16:16", "--batch-size", "8", "--epochs", "1", "--knn-every", "0", "--workers", "0",
       "--warmup-epochs", "0", "--log-every", "1"]
NANO = ["--arch", "vit_nano", "--patch-size", "8"]
HEADS = {"simclr": ["--proj-hidden", "32", "--proj-dim", "16"],
         "moco": ["--proj-hidden", "32", "--proj-dim", "16"],
         "byol": ["--proj-hidden", "32", "--proj-dim", "16", "--pred-hidden", "32"],
         "simsiam": ["--proj-hidden", "32", "--proj-dim", "16", "--pred-hidden", "8"],
         "mae": ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "4", "--visualize", "0"],
         "dino": ["--out-dim", "64", "--head-hidden", "32", "--head-bottleneck", "16", "--local-crops", "0"]}


def train(method, *flags):
    module = importlib.import_module(method)
    module.main(module.get_args_parser().parse_args([*RUN, *NANO, *HEADS[method], *flags]))


def strict_json(path):
    """Every line of a log.jsonl parses as strict JSON (no bare NaN / Infinity)."""
    def refuse(constant):
        raise ValueError(f"{path}: bare {constant}, not JSON")
    return [json.loads(line, parse_constant=refuse) for line in open(path)]


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(method, tmp_path, monkeypatch):
    # Before: loss=nan, exit 0, and checkpoint.pth overwritten with NaN weights.
    out = ["--output-dir", str(tmp_path)]
    train(method, "--epochs", "1", *out)
    good = (tmp_path / "checkpoint.pth").read_bytes()
    module = importlib.import_module(method)
    real_step = module.training_step

    def nan_step(*args, **kwargs):  # (loss, ...) -> (NaN, ...), the rest as it was
        loss, *rest = real_step(*args, **kwargs)
        return (loss * float("nan"), *rest)
    monkeypatch.setattr(module, "training_step", nan_step)
    with pytest.raises(common.UserError) as error:
        train(method, "--epochs", "2", *out)
    message = str(error.value)
    assert "diverged (loss nan) at epoch 2, step 3" in message and "--base-lr" in message and "lr " in message
    assert (tmp_path / "checkpoint.pth").read_bytes() == good  # byte-identical
    assert [record["epoch"] for record in strict_json(tmp_path / "log.jsonl")] == [1]


def test_real_divergence_keeps_the_last_finite_checkpoint(tmp_path):
    # The command: a huge lr (measured: epoch 1 finite, NaN in epoch 2). What is on disk stays finite.
    with pytest.raises(common.UserError,
                       match=r"diverged \(loss -?(nan|inf)\) at epoch \d, step \d+, lr .*try a lower --base-lr"):
        train("simclr", "--epochs", "3", "--base-lr", "1e6", "--output-dir", str(tmp_path))
    if (tmp_path / "checkpoint.pth").exists():  # on CPU, the epoch-1 checkpoint (NaN came in epoch 2)
        saved = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
        assert (saved["epoch"] < 3 and common.all_finite(saved["model"])
                and common.all_finite(saved["optimizer"]["state"][0]))


def test_nonfinite_weights_are_caught_before_the_save(tmp_path, monkeypatch):
    # A finite last loss does not prove finite weights: the last update can still blow them up.
    real_step = common.LARS.step

    def poisoning_step(self):
        real_step(self)
        self.param_groups[0]["params"][0].data.fill_(float("inf"))
    monkeypatch.setattr(common.LARS, "step", poisoning_step)
    with pytest.raises(common.UserError, match="diverged"):
        train("simclr", "--epochs", "1", "--data", "shapes:16:8", "--output-dir", str(tmp_path))  # one step
    assert not (tmp_path / "checkpoint.pth").exists()


def test_log_and_collapse_warning_never_hide_nan(tmp_path):
    common.log_jsonl(tmp_path / "log.jsonl", {"epoch": 1, "loss": float("nan"), "knn_top1": float("inf")})
    assert strict_json(tmp_path / "log.jsonl") == [{"epoch": 1, "loss": None, "knn_top1": None}]
    assert common.collapse_warning(float("nan"), 128) is not None  # was None: NaN < 0.1 is False
    assert common.collapse_warning(1 / 128 ** 0.5, 128) is None


def test_probe_refuses_nonfinite_encoder(tmp_path):
    encoder = common.build_encoder("resnet18", 16)
    state = encoder.state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    common.save_checkpoint(dict(method="simclr", encoder_config=dict(arch="resnet18", image_size=16, patch_size=16),
                                encoder=state, args={}), str(tmp_path / "c.pth"))
    assert "non-finite" in user_error("probe", str(tmp_path / "c.pth"), "--data", "shapes:16:16")


def test_mae_mask_ratio_zero_is_refused(tmp_path):
    # 0 hides no patch: the loss is 0/0 = NaN from the first step.
    assert "(0, 1)" in user_error("mae", *RUN, *NANO, "--mask-ratio", "0", "--output-dir", str(tmp_path))


@pytest.fixture
def sigterm_is_loud():
    """Until a script installs its own handler, SIGTERM raises here rather than killing pytest."""
    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM reached the default handler")
    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("method,path,signal_at,saved_at,stop", [
    ("mae", [], 6, 6, "at epoch 2, step 6"),
    ("simclr", ["--cpu-augment", "--workers", "2"], 6, 6, "at epoch 2, step 6"),
    ("mae", ["--log-every", "3"], 5, 6, "at epoch 2, step 6"), ("mae", [], 4, 4, "at the end of epoch 1, step 4")],
    ids=["device-path", "worker-path", "log-every-3", "epoch-end"])
def test_sigterm_saves_mid_epoch_and_resumes_exactly(method, path, signal_at, saved_at, stop, tmp_path, monkeypatch,
                                                     sigterm_is_loud):
    """SIGTERM in step 6 of 8 (epoch 2 of 2): saved at the step boundary, the same command resumes, and the
    result is bit-identical to a straight run. MAE's masks come from the main RNG (restored); on the worker
    path, the workers' seeds must follow the epoch (persistent workers kept their first epoch's RNG). With
    --log-every 3, a signal in step 5 is agreed on at step 6 (the agreements: every 3 steps and each epoch's
    end). In an epoch's last step (4), the epoch saves as usual and the run stops there."""
    flags = ["--data", "shapes:16:32", "--epochs", "2", *path]
    train(method, *flags, "--output-dir", str(tmp_path / "straight"))
    module = importlib.import_module(method)
    real_step, calls = module.training_step, []

    def signalled_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster sends before it kills
        return real_step(*args, **kwargs)
    monkeypatch.setattr(module, "training_step", signalled_step)
    with pytest.raises(common.UserError, match=f"stopped by SIGTERM {stop}:"):
        train(method, *flags, "--output-dir", str(tmp_path / "preempted"))
    assert len(calls) == saved_at  # stopped at the first agreement after the signal
    at_kill = torch.load(tmp_path / "preempted" / "checkpoint.pth", weights_only=False)
    assert (at_kill["epoch"], at_kill["step"]) == (saved_at // 4 if saved_at % 4 == 0 else 1, saved_at)
    monkeypatch.setattr(module, "training_step", real_step)
    train(method, *flags, "--output-dir", str(tmp_path / "preempted"))
    load = lambda out: torch.load(tmp_path / out / "checkpoint.pth", weights_only=False)  # noqa: E731
    assert_same_state(load("straight"), load("preempted"))


FAULT_ON_ONE_RANK = """import os, signal, sys
sys.path.insert(0, os.getcwd())
import common, simclr
fault, real_step, calls = sys.argv.pop(1), simclr.training_step, []
def step(*args, **kwargs):  # only rank 1 is hit, in its 3rd step: SIGTERM, or a NaN loss
    calls.append(1)
    hit = os.environ["RANK"] == "1" and len(calls) == 3
    if hit and fault == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    loss, *rest = real_step(*args, **kwargs)
    return (loss * float("nan") if hit and fault == "nan" else loss, *rest)
simclr.training_step = step
try:
    simclr.main(simclr.get_args_parser().parse_args(sys.argv[1:]))
except common.UserError as error:
    sys.exit(common.error_line("simclr.py", error))
"""


def test_sigterm_on_one_rank_stops_all_ranks_at_the_same_step_and_resumes_exactly(tmp_path):
    """2 gloo ranks, SIGTERM to rank 1 in step 3 of 8 (epoch 1 of 2): both stop at that step boundary and rank 0
    saves; the same command resumes mid-epoch, to the end, bit-identical to a straight 2-rank run."""
    (tmp_path / "fault_on_one_rank.py").write_text(FAULT_ON_ONE_RANK)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = [*RUN, *NANO, *HEADS["simclr"], "--data", "shapes:16:32", "--epochs", "2", "--output-dir"]
    result = run_script(*torchrun, str(tmp_path / "fault_on_one_rank.py"), "sigterm", *flags, str(tmp_path / "o"),
                        threads=1)
    assert result.returncode != 0
    stopped = [line for line in result.stderr.splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1 and "at epoch 1, step 3" in stopped[0], result.stderr  # rank 0 agreed and saved, one line
    saved = torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=False)
    assert (saved["epoch"], saved["step"]) == (0, 3)
    # each rank resumes its own
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["cpu"], saved["rng"][1]["cpu"])
    for out in ("o", "straight"):  # the same command again resumes; a straight run for comparison
        result = run_script(*torchrun, "simclr.py", *flags, str(tmp_path / out), threads=1)
        assert result.returncode == 0, result.stderr
    load = lambda out: torch.load(tmp_path / out / "checkpoint.pth", weights_only=False)  # noqa: E731
    assert (load("o")["epoch"], load("o")["step"]) == (2, 8)
    assert_same_state(load("straight"), load("o"))


def test_a_nonfinite_loss_on_one_rank_stops_every_rank_with_one_line_and_no_save(tmp_path):
    """Rank 1's loss is NaN in step 3 (rank 0's is finite): both ranks stop at that step's agreement, exit 1, rank 0
    prints the one line, nothing is saved. (Before: rank 1 stopped alone, rank 0 waited in its next collective until
    torchrun killed it, and no line said why.)"""
    (tmp_path / "fault_on_one_rank.py").write_text(FAULT_ON_ONE_RANK)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = [*RUN, *NANO, *HEADS["simclr"], "--data", "shapes:16:32", "--epochs", "2", "--output-dir", str(tmp_path)]
    result = run_script(*torchrun, str(tmp_path / "fault_on_one_rank.py"), "nan", *flags, threads=1, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "diverged" in line]
    assert len(lines) == 1 and "a non-finite loss on another rank) at epoch 1, step 3" in lines[0], result.stderr
    assert "exitcode  : 1" in result.stderr and "Signals.SIGTERM" not in result.stderr, result.stderr  # no rank killed
    assert not (tmp_path / "checkpoint.pth").exists()


def test_a_second_sigterm_is_not_swallowed(sigterm_is_loud):
    preempted = common.Preemption()
    os.kill(os.getpid(), signal.SIGTERM)
    assert preempted.signalled
    with pytest.raises(RuntimeError, match="default handler"):  # the handler before it (here: the fixture's)
        os.kill(os.getpid(), signal.SIGTERM)


def test_save_every_keeps_numbered_snapshots(tmp_path):
    train("simclr", "--epochs", "3", "--data", "shapes:16:8", "--save-every", "1", "--keep", "2",
          "--output-dir", str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint_0002.pth", "checkpoint_0003.pth", "log.jsonl"]
    assert torch.load(tmp_path / "checkpoint_0002.pth", weights_only=False)["epoch"] == 2
    assert (tmp_path / "checkpoint_0003.pth").read_bytes() == (tmp_path / "checkpoint.pth").read_bytes()
    # Hard links, no extra disk: the last snapshot IS the rolling checkpoint's file until the next save replaces it
    inode = lambda name: os.stat(tmp_path / name).st_ino  # noqa: E731
    assert inode("checkpoint_0003.pth") == inode("checkpoint.pth") != inode("checkpoint_0002.pth")


def test_resume_with_other_flags_is_refused(tmp_path):
    out = ["--output-dir", str(tmp_path)]
    train("simclr", "--epochs", "1", "--data", "shapes:16:8", *out)
    good = (tmp_path / "checkpoint.pth").read_bytes()
    # Before: "resumed ... at epoch 1" and trained on with the new data, batch and lr; a head width: a traceback.
    line = user_error("simclr", *RUN, *NANO, *HEADS["simclr"], "--epochs", "2", "--data", "shapes:16:16",
                      "--base-lr", "0.5", "--proj-dim", "8", "--rot90", *out)
    assert "--data shapes:16:8 (now shapes:16:16)" in line and "--base-lr 0.3 (now 0.5)" in line
    assert "--rot90 False (now True)" in line  # other views: another run
    assert "--proj-dim 16 (now 8)" in line and "--epochs" in line.split("only")[1]  # and says what may change
    assert (tmp_path / "checkpoint.pth").read_bytes() == good
    # What may change: more epochs, another number of workers, the monitor.
    train("simclr", "--epochs", "2", "--data", "shapes:16:8", "--knn-every", "2", *out)
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=False)["epoch"] == 2
    assert "already trained 2 epochs" in user_error("simclr", *RUN, *NANO, *HEADS["simclr"], "--epochs", "1",
                                                    "--data", "shapes:16:8", *out)


def test_resume_from_a_path_with_the_monitor_added(tmp_path, monkeypatch):
    """--resume PATH continues that run in another OUTPUT_DIR: its epoch 2 only, ending on the straight run's
    weights. --val (with --knn-every) and --skip-bad-images change what a run reports or skips, not what it
    computes: they may be added when it resumes."""
    real_save = common.save_checkpoint

    def save_and_keep(state, path):  # the straight run's epoch-1 checkpoint, kept aside
        real_save(state, path)
        if state["epoch"] == 1:
            real_save(state, str(tmp_path / "epoch1.pth"))
    monkeypatch.setattr(common, "save_checkpoint", save_and_keep)
    train("simclr", "--epochs", "2", "--output-dir", str(tmp_path / "straight"))
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    train("simclr", "--epochs", "2", "--resume", str(tmp_path / "epoch1.pth"), "--val", "shapes:16:16",
          "--knn-every", "1", "--skip-bad-images", "--output-dir", str(tmp_path / "resumed"))
    log = strict_json(tmp_path / "resumed" / "log.jsonl")
    assert [record["epoch"] for record in log] == [2] and 0 <= log[0]["knn_top1"] <= 1
    load = lambda out: torch.load(tmp_path / out / "checkpoint.pth", weights_only=False)  # noqa: E731
    assert_same_state(load("straight"), load("resumed"))


def image_folder(root, splits):
    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                shapes.Shapes(image_size=16).__getitem__(i)[0].save(root / split / name / f"{i}.png")


def test_val_classes_are_mapped_by_name(tmp_path):
    image_folder(tmp_path / "d", {"train": ["ant", "bee", "cat"], "val": ["bee", "cat"]})
    val = common.build_dataset(str(tmp_path / "d"), "val")
    # Before: val/ numbered its own folders, bee = 0 and cat = 1, while train/ has bee = 1 and cat = 2.
    assert [label for _, label in val.samples] == [1, 1, 2, 2] and val.targets == [1, 1, 2, 2]
    assert val.class_to_idx == {"ant": 0, "bee": 1, "cat": 2}
    image_folder(tmp_path / "e", {"train": ["ant", "bee"], "val": ["bee", "dog"]})
    with pytest.raises(common.UserError, match="val/ has classes that train/ lacks: dog"):
        common.build_dataset(str(tmp_path / "e"), "val")


def test_knn_monitor_warns_for_unlabelled_train_folder(tmp_path, capsys):
    image_folder(tmp_path / "d", {"train": ["unlabeled"], "val": ["ant", "bee"]})
    encoder = common.build_encoder("resnet18", 16)
    args = simclr.get_args_parser().parse_args(["--data", str(tmp_path / "d"), "--image-size", "16", "--workers", "0"])
    assert common.knn_monitor(encoder, args, 4, common.DistEnv()) is None
    assert "k-NN monitor off" in capsys.readouterr().out


def test_16_bit_png_keeps_its_values(tmp_path):
    pixels = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(pixels).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    rgb = np.asarray(common.read_image(tmp_path / "grey16.png"))
    assert rgb.shape == (8, 8, 3) and (rgb == 128).all()  # was 255: clipped, almost white


def test_image_over_the_size_limit_is_named(tmp_path, monkeypatch):
    shapes.Shapes(image_size=64).__getitem__(0)[0].save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # a decompression bomb: over twice the limit
    with pytest.raises(common.UserError, match="cannot read image .*huge.png.*exceeds limit"):
        common.read_image(tmp_path / "huge.png")


def test_in_memory_path_is_capped_by_decoded_bytes(monkeypatch, capsys):
    dataset = shapes.Shapes(image_size=16, num_images=64, transform=common.MultiView([common.View(16)]))
    monkeypatch.setattr(device_views, "free_memory", lambda device: 2 * 64 * 3 * 16 * 16 - 1)  # just too little
    loader = common.make_loader(dataset, 8, common.DistEnv(), 0)
    assert isinstance(loader, torch.utils.data.DataLoader) and "DataLoader workers" in capsys.readouterr().out
    monkeypatch.setattr(device_views, "free_memory", lambda device: 2 * 64 * 3 * 16 * 16)
    assert isinstance(common.make_loader(dataset, 8, common.DistEnv(), 0), device_views.DeviceLoader)
    assert "held and augmented on cpu" in capsys.readouterr().out
    monkeypatch.undo()
    assert device_views.free_memory(torch.device("cpu")) > 2**20  # the real RAM reading works here


def test_unwritable_output_dir_fails_at_start(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    line = user_error("simclr", *RUN, *NANO, "--epochs", "1", "--output-dir", str(tmp_path / "file" / "run"))
    assert line.startswith(f"--output-dir {tmp_path / 'file' / 'run'} is not writable")


def test_full_disk_during_save_names_the_path(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    common.save_checkpoint({"epoch": 1}, path)

    def full_disk(obj, f, *args, **kwargs):
        open(f, "wb").write(b"PK\x03\x04 half")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file: "
                           "unexpected pos 64")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(common.UserError, match=f"could not write {path} \\(is the disk full"):
        common.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1 and not os.path.exists(path + ".tmp")


@pytest.mark.parametrize("method,flags,message", [
    ("dino", ["--global-crops-scale", "1.0", "0.4"], "--global-crops-scale 1.0 0.4: expected MIN MAX"),
    ("dino", ["--local-crops-scale", "0", "0.4"], "--local-crops-scale 0.0 0.4: expected MIN MAX"),
    ("moco", ["--crop-min", "2"], "--crop-min 2.0 is not an area fraction"),
    ("simsiam", ["--base-lr", "-1"], "--base-lr -1.0 is negative")])
def test_bad_flag_values_are_one_line(method, flags, message, tmp_path):
    # Before: 20-line tracebacks from inside the augmentations; a negative lr trained uphill.
    assert user_error(method, *RUN, *NANO, *HEADS[method], *flags, "--output-dir", str(tmp_path)).startswith(message)


def test_warmup_longer_than_the_run_is_warned(tmp_path, capsys):
    train("simclr", "--epochs", "1", "--data", "shapes:16:8", "--warmup-epochs", "3", "--output-dir", str(tmp_path))
    assert "warning: --warmup-epochs 3 is longer than the run (--epochs 1)" in capsys.readouterr().out


def test_error_line_is_printed_once_under_torchrun(monkeypatch):
    # The exit code itself (1, as UserError's docstring says) is checked end to end in
    # test_errors.test_missing_data_path.
    assert "exit with code 1" in " ".join(common.UserError.__doc__.split())
    monkeypatch.setenv("RANK", "1")  # another torchrun rank: a silent exit code 1; rank 0 prints the line
    assert common.error_line("simclr.py", common.UserError("boom")) == 1
    monkeypatch.setenv("RANK", "0")
    assert common.error_line("simclr.py", common.UserError("boom")) == "simclr.py: error: boom"
    for method in METHODS:  # CPU ranks are processes, not GPUs
        main = open(importlib.import_module(method).__file__).read().split("def main")[1]
        assert not [line for line in main.splitlines() if "UserError(" in line and "GPU" in line]


@pytest.mark.parametrize("method", METHODS)
def test_docstring_commands_paste_into_a_shell(method):
    """What the source shows is what __doc__ prints: one backslash before each continued line."""
    module = importlib.import_module(method)
    source = open(module.__file__).read()
    assert module.__doc__ in source  # a non-raw docstring turns \\ into \ (and a lone \ joins the lines)
    continued = [line for line in module.__doc__.splitlines() if line.rstrip().endswith("\\")]
    assert continued and all(line.endswith(" \\") and not line.endswith("\\\\") for line in continued)


@pytest.mark.parametrize("method", METHODS)
def test_steps_make_the_cpu_wait_for_the_device_only_every_log_every_steps(method, tmp_path, monkeypatch):
    """Every host read of a device tensor (.item, float, int, bool, .tolist) stalls a GPU pipeline. Twice the steps in
    one epoch, with --log-every above both, make this project's code read no more: only the epoch's end reads. (Reads
    inside torch are not counted: its optimizers read their step counters, which live on the CPU.)"""
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        def counted(self, *args, _real=getattr(torch.Tensor, name), _name=name):
            caller = sys._getframe(1).f_code.co_filename
            if os.path.dirname(os.path.abspath(caller)) == os.path.dirname(os.path.abspath(common.__file__)):
                reads.append(f"{_name} in {os.path.basename(caller)}:{sys._getframe(1).f_lineno}")
            return _real(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for images in (32, 64):  # 4 and 8 steps
        reads.clear()
        train(method, "--data", f"shapes:16:{images}", "--log-every", "100", "--output-dir",
              str(tmp_path / str(images)))
        counts.append(sorted(reads))
    assert counts[1] == counts[0]
