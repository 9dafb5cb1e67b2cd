"""benchmarks/learning.py end to end at a smoke scale: MAE (every readout: k-NN, linear, fine-tune),
9 steps on 192 images; the numbers mean nothing, the plumbing is checked. The other methods differ
only in their RECIPES flags and, for DINO, in which network is the encoder (the teacher backbone):
every benchmark run checks its random init against the script's epoch-0 k-NN the same way."""
import json

from benchmarks.learning import RECIPES
from helpers import run_script


def test_learning_benchmark_smoke_run(tmp_path):
    result = run_script("benchmarks/learning.py", "--methods", "mae", "--seeds", "0",
                        "--data", "shapes:32:192:64", "--steps-scale", "0.004", "--linear-epochs", "2", "--finetune-epochs", "1",
                        "--threads", "2", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.load(open(tmp_path / "results.json"))
    assert list(report["summary"]) == ["mae"]
    for method, entry in report["summary"].items():
        assert list(entry["readouts"]) == ["knn", "linear", "finetune"]
        for r in entry["readouts"].values():
            (init, init_std), (trained, _) = r["random_init"], r["trained"]
            assert 0 <= init <= 100 and 0 <= trained <= 100 and init_std is None  # one seed: no std
            assert abs(r["gain"] - (trained - init)) < 1e-9 and r["gain_over_std"] is None
    for run in report["runs"]:
        # The random-init checkpoint built in-process is the encoder the script started from.
        assert run["init_matches_log"], run["knn"]
        assert run["knn"]["random_init"] == run["knn"]["logged_epoch0"]
        assert run["command"].startswith(f"python {RECIPES[run['method']]['script']} ")
        assert run["knn_curve"][0] == [0, run["knn"]["logged_epoch0"]] and len(run["knn_curve"]) >= 2
    table = (tmp_path / "results.md").read_text()
    assert "| method | steps | train min | readout | random init | trained | gain | gain / std |" in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| mae |")]
    assert [row[3] for row in rows[:3]] == ["knn", "linear", "finetune"] and len(rows) == 4  # + the per-run row
    assert table in result.stdout  # printed as written
    assert (tmp_path / "knn_vs_step.png").exists() or "matplotlib is not installed" in result.stdout
