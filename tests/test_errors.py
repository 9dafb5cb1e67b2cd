"""Bad input ends in one clear error line and a nonzero exit, and never harms a checkpoint."""
import importlib
import importlib.util
import socket

import pytest
import torch

import common
import shapes
from helpers import error_line, run_script

TINY = ["--arch", "resnet18", "--batch-size", "8", "--epochs", "1", "--knn-every", "0", "--workers", "0"]


def user_error(script, *argv):
    """Run SCRIPT's main in this process (a subprocess costs seconds of imports); the error it raises
    is what its __main__ prints as its one line, which the subprocess tests below check end to end."""
    module = importlib.import_module(script)
    with pytest.raises(common.UserError) as error:
        module.main(module.get_args_parser().parse_args(list(argv)))
    assert "\n" not in str(error.value)
    return str(error.value)


def test_missing_data_path(tmp_path):
    result = run_script("simclr.py", "--data", str(tmp_path / "nope"), *TINY, "--output-dir", str(tmp_path / "o"))
    line = error_line(result)
    assert line.startswith("simclr.py: error: --data") and "no such folder" in line
    assert result.returncode == 1  # as UserError's docstring says (argparse's own usage errors exit 2)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    line = user_error("simclr", "--data", str(tmp_path / "empty"), *TINY, "--output-dir", str(tmp_path / "o"))
    assert "empty" in line and "class" in line.lower()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_is_named(tmp_path, workers):
    for c in ("a", "b"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(4):
            shapes.Shapes().__getitem__(i)[0].save(tmp_path / "data" / "train" / c / f"{i}.png")
    (tmp_path / "data" / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    flags = ["--data", str(tmp_path / "data"), *TINY[:-1], workers, "--knn-every", "1",
             "--output-dir", str(tmp_path / "o")]
    # --workers 0 raises in this process; 1 raises in a worker, whose traceback must still end as one line
    line = user_error("simclr", *flags) if workers == "0" else error_line(run_script("simclr.py", *flags))
    # (no val/ split: the k-NN monitor is skipped, not an error)
    assert "cannot read image" in line and "broken.jpg" in line


def test_offline_download_fails_fast(tmp_path, monkeypatch):
    """No network, whatever this machine has (the socket is blocked here): one line, not a hang or a traceback."""
    attempts = []

    def blocked(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")
    for owner, name in ((socket, "create_connection"), (socket, "getaddrinfo"), (socket.socket, "connect")):
        monkeypatch.setattr(owner, name, blocked)
    line = user_error("simclr", "--data", "cifar10", "--data-root", str(tmp_path), *TINY,
                      "--output-dir", str(tmp_path / "o"))
    assert "could not load or download cifar10" in line and "network blocked by the test" in line
    assert attempts  # the download did try, and the block answered it


def test_dataset_smaller_than_a_batch(tmp_path):
    line = user_error("simclr", "--data", "shapes:16:4", *TINY, "--output-dir", str(tmp_path / "o"))
    assert "cannot fill one batch" in line


def test_vit_patch_must_divide_image(tmp_path):
    line = user_error("simclr", "--data", "shapes:30:64", "--arch", "vit_nano", "--patch-size", "8",
                      "--batch-size", "8", "--knn-every", "0", "--workers", "0", "--output-dir", str(tmp_path))
    assert "not a multiple of the patch size" in line


def test_resume_from_another_methods_checkpoint(tmp_path):
    common.save_checkpoint({"method": "moco", "encoder_config": {}, "encoder": {}}, str(tmp_path / "checkpoint.pth"))
    line = user_error("simclr", "--data", "shapes:16:64", *TINY, "--output-dir", str(tmp_path))
    assert "is a moco checkpoint, not simclr" in line


def test_probe_rejects_foreign_files(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pth")
    line = error_line(run_script("probe.py", str(tmp_path / "foreign.pth"), "--data", "shapes:16:64"))
    assert line.startswith("probe.py: error:") and "not written by this project" in line and "--arch" in line
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage")
    assert "not a readable torch file" in user_error("probe", str(tmp_path / "garbage.pth"), "--data", "shapes")
    assert "no such file" in user_error("probe", str(tmp_path / "missing.pth"), "--data", "shapes")
    checkpoint = str(tmp_path / "c.pth")  # a good checkpoint compared with bad files: one line each, before any work
    common.save_checkpoint(dict(method="simclr", encoder_config=dict(arch="vit_nano", image_size=16, patch_size=8),
                                encoder=common.build_encoder("vit_nano", 16, 8).state_dict(), args={}), checkpoint)
    for other, expected in ((tmp_path / "missing.pth", "no such file"), (tmp_path / "garbage.pth", "not a readable"),
                            (tmp_path / "foreign.pth", "in --compare, FILE:ARCH"),
                            (f"{tmp_path / 'foreign.pth'}:resnet18", "does not fit a resnet18"),
                            (f"{checkpoint}:resnet81", "unknown arch 'resnet81'"),  # was "c.pth:resnet81: no such file"
                            (f"{tmp_path / 'missing.pth'}:resnet81", "missing.pth: no such file")):
        assert expected in user_error("probe", checkpoint, "--data", "shapes:16:64", "--protocol", "knn", "--compare",
                                      str(other), "--workers", "0")
    assert "already probed" in user_error("probe", checkpoint, "--data", "shapes:16:64", "--compare", checkpoint)


def test_probe_plain_state_dict_of_wrong_arch(tmp_path):
    torch.save(common.build_encoder("resnet18", 32).state_dict(), tmp_path / "r18.pth")
    line = user_error("probe", str(tmp_path / "r18.pth"), "--arch", "resnet50", "--data", "shapes:32:64")
    assert ("does not fit a resnet50" in line and "keys differ" in line and "--arch" in line
            and len(line) < 300)  # was 2.7 KB
    (tmp_path / "random.pth").write_bytes(b"\x00" + bytes(range(256)) * 4)
    line = error_line(run_script("probe.py", str(tmp_path / "random.pth"), "--arch", "resnet18",
                                 "--data", "shapes:32:64"))
    assert line.startswith("probe.py: error:") and "not a readable torch file" in line


def test_probe_vit_protocols_on_a_resnet_and_missing_plot_extras(tmp_path):
    torch.save(common.build_encoder("resnet18", 32).state_dict(), tmp_path / "r18.pth")
    flags = [str(tmp_path / "r18.pth"), "--arch", "resnet18", "--data", "shapes:32:64", "--workers", "0"]
    assert "ViT protocol" in user_error("probe", *flags, "--recipe", "mae")
    assert "ViT readouts" in user_error("probe", *flags, "--n-last-blocks", "4")
    if importlib.util.find_spec("matplotlib") is None:  # optional: one line that says how to get it
        assert "--plot pca needs matplotlib: pip install" in user_error("probe", *flags, "--plot", "pca")


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    common.save_checkpoint({"epoch": 1, "weights": torch.ones(4)}, path)

    def crashing_save(obj, f, *args, **kwargs):  # dies half-way through writing
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crashing_save)
    # one line naming the file
    with pytest.raises(common.UserError, match="could not write .*checkpoint.pth .*disk full"):
        common.save_checkpoint({"epoch": 2, "weights": torch.zeros(4)}, path)
    monkeypatch.undo()
    previous = torch.load(path)
    assert previous["epoch"] == 1 and previous["weights"].sum() == 4


# Widths of 0 ran on with NaN collapse signals or crashed in an MLP (IndexError); τ = 0 gave NaN losses.
WIDTHS = {"simclr": [("--proj-dim", "0", "positive_int"), ("--temperature", "0", "positive_float")],
          "moco": [("--proj-hidden", "0", "positive_int"), ("--temperature", "-0.2", "positive_float")],
          "byol": [("--pred-hidden", "0", "positive_int")],
          "simsiam": [("--proj-dim", "0", "positive_int")],
          "mae": [("--decoder-heads", "0", "positive_int"), ("--decoder-depth", "-1", "positive_int")],
          "dino": [("--out-dim", "0", "positive_int"), ("--local-crops", "-1", "non_negative_int"),
                   ("--teacher-temp", "0", "positive_float")]}


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "simsiam", "mae", "dino"])
def test_out_of_range_counts_are_one_line(method, capsys):
    parser = importlib.import_module(method).get_args_parser()
    for flag, value, kind in [("--batch-size", "0", "positive_int"), ("--epochs", "-1", "positive_int"),
                              ("--image-size", "0", "positive_int"), ("--workers", "-1", "non_negative_int"),
                              ("--warmup-epochs", "-1", "non_negative_int"), ("--knn-every", "-1", "non_negative_int"),
                              ("--patch-size", "0", "positive_int"),  # was a ZeroDivisionError in build_encoder
                              *WIDTHS[method]]:
        # argparse's own rejection: the usage, then one error line, exit code 2 (before, a ZeroDivisionError or
        # the DataLoader's ValueError deep in the run, or a silent default for --image-size 0)
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--data", "shapes", flag, value])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            f"argument {flag}: invalid {kind} value: '{value}'")


@pytest.mark.parametrize("spec", ["shapes:abc", "shapes:32:0", "shapes:32:10:10:10"])
def test_bad_shapes_spec(spec, tmp_path):
    assert "expected shapes[:SIZE[:N[:V]]]" in user_error("simclr", "--data", spec, *TINY,
                                                          "--output-dir", str(tmp_path))


def test_probe_out_of_range_counts_are_one_line(capsys):
    probe = importlib.import_module("probe")
    for flag, value, kind in [("--batch-size", "0", "positive_int"), ("--seeds", "0", "positive_int"),
                              ("--k", "0", "positive_int"), ("--linear-epochs", "0", "positive_int"),
                              ("--knn-temperature", "0", "positive_float"),
                              ("--finetune-warmup-epochs", "-1", "non_negative_int"),
                              ("--label-fraction", "0", "fraction"), ("--label-fraction", "1.5", "fraction"),
                              ("--output", "checkpoint.pth", "json_file")]:  # was: the JSON over the checkpoint
        with pytest.raises(SystemExit) as exit_:
            probe.get_args_parser().parse_args(["checkpoint.pth", "--data", "shapes", flag, value])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            f"argument {flag}: invalid {kind} value: '{value}'")
