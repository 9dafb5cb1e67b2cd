"""embed.py: a folder's features as probe.py reads them, on one process and on 2 ranks; neighbours; bad input."""
import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
import embed
import probe
import weights
from helpers import run_script
from test_errors import user_error
from test_practitioner import write_images


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A project checkpoint of a random vit_nano/8 at 16 px, trained on unusual pixels (to check they travel)."""
    torch.manual_seed(0)
    encoder = common.build_encoder("vit_nano", 16, 8)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    common.save_checkpoint(dict(method="simclr", encoder_config=dict(arch="vit_nano", image_size=16, patch_size=8),
                                encoder=encoder.state_dict(), args=dict(mean=[0.5] * 3, std=[0.25] * 3)), str(path))
    return str(path)


def run(checkpoint, *flags):
    embed.main(embed.get_args_parser().parse_args([checkpoint, "--workers", "0", *flags]))


def test_a_labelled_folder_gives_probes_features_paths_and_labels(checkpoint, tmp_path):
    for name, start in (("circles", 0), ("squares", 10)):
        write_images(tmp_path / "data" / name, 3, start)
    run(checkpoint, "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out.npz"))
    out = np.load(tmp_path / "out.npz")
    assert out["features"].shape == (6, 128) and out["features"].dtype == np.float32
    assert list(out["paths"]) == [f"circles/{i}.png" for i in range(3)] + [f"squares/{i}.png" for i in range(10, 13)]
    assert list(out["labels"]) == [0, 0, 0, 1, 1, 1] and list(out["classes"]) == ["circles", "squares"]
    # probe.py's readout of the same image, with the run's normalisation: the same vector
    args = probe.get_args_parser().parse_args([checkpoint, "--data", str(tmp_path / "data")])
    encoder, size = weights.load_encoder(args)
    image = common.eval_transform(size, [0.5] * 3, [0.25] * 3)(Image.open(tmp_path / "data" / "squares" / "11.png"))
    with torch.no_grad():
        expected = weights.Readout(encoder).eval()(image[None])[0]
    torch.testing.assert_close(torch.from_numpy(out["features"][4]), expected, atol=1e-5, rtol=1e-5)


def test_an_unlabelled_nested_dump_has_paths_only(checkpoint, tmp_path):
    write_images(tmp_path / "dump" / "2024" / "05", 2)
    write_images(tmp_path / "dump" / "2024" / "06", 2, start=2)
    run(checkpoint, "--data", str(tmp_path / "dump"), "--output", str(tmp_path / "out.npz"))
    out = np.load(tmp_path / "out.npz")
    assert sorted(out) == ["features", "paths"] and len(out["paths"]) == 4
    assert out["paths"][0] == "2024/05/0.png"


def test_a_duplicate_is_the_first_neighbour_of_its_copy(checkpoint, tmp_path):
    write_images(tmp_path / "data", 8)
    shutil.copy(tmp_path / "data" / "3.png", tmp_path / "data" / "3_copy.png")
    write_images(tmp_path / "query", 1, start=5)  # the same image as data/5.png
    out = str(tmp_path / "out.npz")
    run(checkpoint, "--data", str(tmp_path / "data"), "--output", out, "--neighbours", "2")
    rows = list(csv.DictReader(open(tmp_path / "out_neighbours.csv")))
    first = {row["query"]: row for row in rows if row["rank"] == "1"}
    assert len(rows) == 2 * 9 and first["3.png"]["neighbour"] == "3_copy.png"  # never itself
    assert first["3_copy.png"]["neighbour"] == "3.png" and float(first["3.png"]["cosine"]) > 0.9999
    run(checkpoint, "--data", str(tmp_path / "data"), "--output", out, "--neighbours", "1", "--query",
        str(tmp_path / "query"))
    rows = list(csv.DictReader(open(tmp_path / "out_neighbours.csv")))
    assert [(row["query"], row["neighbour"]) for row in rows] == [("5.png", "5.png")]


def test_unreadable_images_are_left_out_or_named(checkpoint, tmp_path):
    write_images(tmp_path / "data", 4)
    (tmp_path / "data" / "2.png").write_bytes(b"not an image")
    out = str(tmp_path / "out.npz")
    assert "2.png" in user_error("embed", checkpoint, "--data", str(tmp_path / "data"), "--output", out,
                                 "--workers", "0")
    run(checkpoint, "--data", str(tmp_path / "data"), "--output", out, "--skip-bad-images")
    assert list(np.load(out)["paths"]) == ["0.png", "1.png", "3.png"]
    assert "no such folder" in user_error("embed", checkpoint, "--data", str(tmp_path / "nowhere"), "--output", out)
    for flags in (["--query", str(tmp_path / "data")], ["--neighbours", "2", "--head", checkpoint]):
        assert "--query needs --neighbours K" in user_error("embed", checkpoint, "--data", str(tmp_path / "data"),
                                                            "--output", out, *flags)  # ignored before: said now
    # np.savez adds .npz to another name (the features went to out.txt.npz, "written to out.txt" said); a CSV of
    # predictions went over whatever --output named, a checkpoint too
    assert "expected a .npz file" in user_error("embed", checkpoint, "--data", str(tmp_path / "data"), "--output",
                                                str(tmp_path / "out.txt"))
    before = open(checkpoint, "rb").read()
    assert "expected a .csv file" in user_error("embed", checkpoint, "--data", str(tmp_path / "data"), "--output",
                                                checkpoint, "--head", checkpoint)
    assert open(checkpoint, "rb").read() == before


def test_two_ranks_write_the_features_of_one_process(checkpoint, tmp_path):
    write_images(tmp_path / "data" / "a", 5)
    write_images(tmp_path / "data" / "b", 4, start=5)  # 9 images: the eval sampler pads one rank's shard
    flags = [checkpoint, "--data", str(tmp_path / "data"), "--workers", "0", "--neighbours", "1"]
    run(*flags[:1], *flags[1:], "--output", str(tmp_path / "one.npz"))
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "embed.py", *flags,
                        "--output", str(tmp_path / "two.npz"), threads=1)
    assert result.returncode == 0, result.stderr
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_allclose(two["features"], one["features"], atol=1e-5)
    assert list(two["paths"]) == list(one["paths"]) and list(two["labels"]) == list(one["labels"])
    assert open(tmp_path / "two_neighbours.csv").read().count("\n") == 10


def labelled_split(root, count):
    """root/{train,val}/<shape>/i.png from the built-in shapes (classes a linear head can learn)."""
    import shapes
    for split, start in (("train", 0), ("val", 10_000)):
        data = shapes.Shapes(image_size=16)
        for i in range(start, start + count):
            image, label = data[i]
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            image.save(root / split / str(label) / f"{i}.png")


@pytest.mark.parametrize("protocol", ["linear", "finetune"])
def test_a_saved_head_predicts_what_probe_measured(checkpoint, tmp_path, protocol):
    """probe.py --save keeps seed 0's model; embed.py --head applies it to the val split: the predictions' top-1 is
    the reported one, to the digit."""
    labelled_split(tmp_path / "data", 48)
    results = probe.main(probe.get_args_parser().parse_args(
        [checkpoint, "--data", str(tmp_path / "data"), "--protocol", protocol, "--seeds", "1", "--linear-epochs", "5",
         "--finetune-epochs", "1", "--workers", "0", "--save", str(tmp_path / "heads"),
         "--output", str(tmp_path / "probe.json")]))
    run(checkpoint, "--head", str(tmp_path / "heads" / f"{protocol}.pth"), "--data", str(tmp_path / "data" / "val"),
        "--output", str(tmp_path / "predictions.csv"))
    saved = torch.load(tmp_path / "heads" / f"{protocol}.pth", weights_only=False)
    assert saved["protocol"] == protocol and saved["encoder_config"] == dict(arch="vit_nano", image_size=16,
                                                                              patch_size=8)
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert len(rows) == 48 and all(row["top5"].split()[0].startswith(row["predicted"] + ":") for row in rows)
    top1 = 100 * sum(row["predicted"] == row["label"] for row in rows) / len(rows)
    assert top1 == pytest.approx(results[protocol]["top1"], abs=1e-4)  # probe.py's is fp32: one image is 2.08
    flat = tmp_path / "unlabelled"  # the same images, no class folders: predictions, no label column
    flat.mkdir()
    for row in rows:
        shutil.copy(tmp_path / "data" / "val" / row["path"], flat / row["path"].replace("/", "_"))
    run(checkpoint, "--head", str(tmp_path / "heads" / f"{protocol}.pth"), "--data", str(flat),
        "--output", str(tmp_path / "unlabelled.csv"))
    unlabelled = {row["path"]: row for row in csv.DictReader(open(tmp_path / "unlabelled.csv"))}
    assert list(next(iter(unlabelled.values()))) == ["path", "predicted", "probability", "top5"]
    assert {row["path"].replace("/", "_"): row["predicted"] for row in rows} == {
        path: row["predicted"] for path, row in unlabelled.items()}
    assert "not a model written by probe.py --save" in user_error(
        "embed", checkpoint, "--head", checkpoint, "--data", str(tmp_path / "data" / "val"), "--output", "x.csv")
