"""benchmarks/throughput.py and --compile run on CPU: a few steps, real numbers, the JSON it promises."""
import json

import pytest

from benchmarks.throughput import TINY_HEADS
from helpers import run_script


METHODS = ["simclr", "moco", "byol", "simsiam", "mae", "dino"]


def test_throughput_benchmark_runs_every_method_on_cpu(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_script("benchmarks/throughput.py", "--configs", "cpu-tiny", "--modes", "synthetic", "--steps", "1",
                        "--warmup", "0", "--output", str(out))
    assert result.returncode == 0, result.stderr
    report = json.load(open(out))
    assert report["device"] == "CPU"
    results = {r["method"]: r for r in report["results"]}
    assert sorted(results) == sorted(METHODS)
    views = dict(simclr=2, moco=2, byol=2, simsiam=2, mae=1, dino=10)  # DINO: 2 global + 8 local crops (the official default)
    for method, r in results.items():
        assert r["images_per_s"] > 0 and r["views_per_s"] == pytest.approx(views[method] * r["images_per_s"])
        # vit_nano/8 at 32 px: 17 tokens through 4 blocks of width 128, forward + backward, per view
        assert 0.01 < r["gflops_per_image"] < 5.0, r
        assert r["mfu"] is None and r["peak_memory_gb"] is None  # no GPU: no peak to compare with
    # MAE's encoder sees a quarter of the tokens: it costs far less per image than a two-view method.
    assert results["mae"]["gflops_per_image"] < results["simclr"]["gflops_per_image"]
    assert "img/s" in result.stdout


def test_throughput_benchmark_input_modes(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_script("benchmarks/throughput.py", "--configs", "cpu-tiny", "--methods", "simclr",
                        "--modes", "synthetic", "device", "dataloader", "--steps", "2", "--warmup", "1",
                        "--workers", "1", "--output", str(out))
    assert result.returncode == 0, result.stderr
    report = json.load(open(out))
    assert [r["mode"] for r in report["results"]] == ["synthetic", "device", "dataloader"]
    for r in report["results"]:
        assert r["images_per_s"] > 0 and r["views_per_s"] == pytest.approx(2 * r["images_per_s"])
        assert r["mfu"] is None and r["peak_memory_gb"] is None  # no GPU: no peak to compare with
    assert "img/s" in result.stdout


@pytest.mark.parametrize("method", ["simclr", "moco", "mae", "dino"])  # the other two are shaped like simclr and moco
def test_compile_flag_trains(method, tmp_path, monkeypatch):
    """--compile wraps the model in torch.compile and training runs through it. Inductor's C++
    code generation takes minutes on 2 cores, so the test compiles with the aot_eager backend: the
    same Dynamo capture and AOT autograd graphs, without the kernel generation."""
    import torch

    module = __import__(method)
    compiled = []
    real_compile = torch.compile

    def compile_aot_eager(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="aot_eager", **kwargs)
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    flags = ["--data", "shapes:16:64", "--arch", "vit_nano", "--patch-size", "8", "--epochs", "1", "--batch-size", "32",
             "--knn-every", "0", "--workers", "0", "--compile", "--output-dir", str(tmp_path), *TINY_HEADS[method]]
    if method == "dino":
        flags += ["--local-crops", "2"]
    module.main(module.get_args_parser().parse_args(flags))
    assert compiled, "--compile did not call torch.compile"
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert not any("_orig_mod" in name for name in checkpoint["model"]), "saved the compiled wrapper's names"
