"""benchmarks/throughput.py and --compile run on CPU: a few steps, real numbers, the JSON it promises."""
import json

import pytest

from benchmarks.throughput import TINY_HEADS
from helpers import run_script


METHODS = ["simclr", "moco", "byol", "simsiam", "mae", "dino"]
# GFLOP per image of --configs cpu-tiny in README's "Speed" table (measured 0.164, 0.221, 0.222, 0.174, 0.032, 0.422
# with torch 2.14.1: FLOPs are counted, not timed, so they move only with the model or the views)
README_GFLOPS = dict(simclr=0.17, moco=0.23, byol=0.23, simsiam=0.18, mae=0.03, dino=0.42)


def test_throughput_benchmark_runs_every_method_on_cpu(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_script("benchmarks/throughput.py", "--configs", "cpu-tiny", "--modes", "device", "--steps", "1",
                        "--warmup", "0", "--output", str(out))
    assert result.returncode == 0, result.stderr
    report = json.load(open(out))
    assert report["device"] == "CPU"
    results = {r["method"]: r for r in report["results"]}
    assert sorted(results) == sorted(METHODS)
    # DINO: 2 global + 8 local crops (the official default)
    views = dict(simclr=2, moco=2, byol=2, simsiam=2, mae=1, dino=10)
    for method, r in results.items():
        assert r["images_per_s"] > 0 and r["views_per_s"] == pytest.approx(views[method] * r["images_per_s"])
        # README's "Speed" table (vit_nano/8 at 32 px, forward + backward; DINO at today's 10 crops), within 10%
        assert r["gflops_per_image"] == pytest.approx(README_GFLOPS[method], rel=0.1), (method, r["gflops_per_image"])
        assert r["mfu"] is None and r["peak_memory_gb"] is None  # no GPU: no peak to compare with
    # MAE's encoder sees a quarter of the tokens: it costs far less per image than a two-view method.
    assert results["mae"]["gflops_per_image"] < results["simclr"]["gflops_per_image"]
    assert "img/s" in result.stdout


def test_throughput_benchmark_input_modes(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_script("benchmarks/throughput.py", "--configs", "cpu-tiny", "--methods", "simclr",
                        "--modes", "device", "dataloader", "--steps", "2", "--warmup", "1",
                        "--workers", "1", "--output", str(out))
    assert result.returncode == 0, result.stderr
    report = json.load(open(out))
    assert [r["mode"] for r in report["results"]] == ["device", "dataloader"]
    for r in report["results"]:
        assert r["images_per_s"] > 0 and r["views_per_s"] == pytest.approx(2 * r["images_per_s"])
        assert r["mfu"] is None and r["peak_memory_gb"] is None  # no GPU: no peak to compare with
    assert "img/s" in result.stdout


@pytest.mark.parametrize("method", ["simclr", "moco", "mae", "dino"])  # the other two are shaped like simclr and moco
def test_compile_flag_trains_the_compiled_model(method, tmp_path, monkeypatch):
    """--compile wraps the model in torch.compile and the compiled module is the one that trains: every forward
    of the step goes through it and after one step the weights equal an eager run's (a compiled copy that the
    optimizer does not hold would leave them at their init). Inductor's C++ code generation takes minutes on 2
    cores, so the test compiles with the aot_eager backend: the same Dynamo capture and AOT autograd graphs,
    without the kernel generation."""
    import torch

    module = __import__(method)
    calls, real_compile = [], torch.compile

    def compile_aot_eager(model, **kwargs):
        compiled = real_compile(model, backend="aot_eager", **kwargs)
        compiled.register_forward_pre_hook(lambda *_: calls.append(1))
        return compiled
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    flags = ["--data", "shapes:16:32", "--arch", "vit_nano", "--patch-size", "8", "--epochs", "1", "--batch-size", "32",
             "--knn-every", "0", "--workers", "0", *TINY_HEADS[method]]
    flags += ["--local-crops", "2"] if method == "dino" else []
    for out, compile_flag in (("eager", []), ("compiled", ["--compile"])):  # one step each
        module.main(module.get_args_parser().parse_args(flags + compile_flag + ["--output-dir", str(tmp_path / out)]))
    assert calls, "--compile did not train through the compiled module"
    eager, compiled = (torch.load(tmp_path / out / "checkpoint.pth", weights_only=False)["model"]
                       for out in ("eager", "compiled"))
    assert not any("_orig_mod" in name for name in compiled), "saved the compiled wrapper's names"
    for name, tensor in eager.items():
        torch.testing.assert_close(compiled[name], tensor, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
