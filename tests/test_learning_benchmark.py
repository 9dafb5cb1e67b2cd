"""benchmarks/learning.py's report, from the MAE run of tests/test_learning.py (every readout: k-NN, linear,
fine-tune); the other methods differ only in their RECIPES flags and, for DINO, in which network is the encoder (the
teacher backbone): every benchmark run checks its random init against the script's epoch-0 k-NN the same way. Also:
--set (the sweeps' recipe overrides) and benchmarks/peer_lightly.py (the peer check; its run needs lightly)."""
import json
import sys

import pytest

from benchmarks import learning, peer_lightly
from benchmarks.learning import RECIPES
from helpers import run_script


@pytest.mark.background_runs("mae")
def test_learning_benchmark_writes_its_report(benchmark_row, background):
    """The MAE run of tests/test_learning.py, as `python benchmarks/learning.py` wrote and printed it: every readout
    (k-NN, linear, fine-tune) summarised, tabled and printed."""
    benchmark_row("mae")  # waits for the run
    out, stdout = background.folder / "mae", (background.folder / "mae.log").read_text()
    report = json.load(open(out / "results.json"))
    assert list(report["summary"]) == ["mae"] and report["threads"] == 1
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
    table = (out / "results.md").read_text()
    assert "| method | steps | train min | readout | random init | trained | gain | gain / std |" in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| mae |")]
    assert [row[3] for row in rows[:3]] == ["knn", "linear", "finetune"] and len(rows) == 4  # + the per-run row
    assert table in stdout  # printed as written
    assert (out / "knn_vs_step.png").exists() or "matplotlib is not installed" in stdout


def test_set_replaces_a_recipe_flag_or_its_warmup_share_for_one_run():
    before = json.dumps(learning.RECIPES)
    argv, steps, epochs = learning.method_command("moco_v2", "shapes:32:640:64", 0, 1.0, "out",
                                                  [learning.recipe_override("base-lr=0.3"),
                                                   learning.recipe_override("warmup=0.5")])
    command = " ".join(argv)
    assert "--base-lr 0.3 " in command and f"--warmup-epochs {round(0.5 * epochs)} " in command and steps == 1500
    assert json.dumps(learning.RECIPES) == before  # the table itself is untouched
    assert learning.recipe_override("global_crops_scale=0.2,1") == ("global_crops_scale", ("0.2", "1"))
    result = run_script("benchmarks/learning.py", "--set", "base_lr", "--dry-run")
    assert result.returncode == 2 and "expected NAME=VALUE" in result.stderr
    # a flag the script lacks, a bad value, a non-number budget: one error line before anything runs
    result = run_script("benchmarks/learning.py", "--methods", "mae", "--set", "no_such_flag=1", "--dry-run")
    assert result.returncode == 2 and "mae.py: error: unrecognized arguments: --no-such-flag 1" in result.stderr
    result = run_script("benchmarks/learning.py", "--methods", "byol", "--set", "base_lr=fast", "--dry-run")
    assert result.returncode == 2 and "invalid float value: 'fast'" in result.stderr
    result = run_script("benchmarks/learning.py", "--methods", "simclr", "--set", "steps=many", "--dry-run")
    assert (result.returncode == 1
            and result.stderr.strip() == "learning.py: error: --set steps=many: steps takes one number")


def test_peer_check_without_lightly_is_one_error_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightly", None)  # import lightly -> ImportError
    with pytest.raises(SystemExit, match="lightly package is not installed"):
        peer_lightly.lightly_or_exit()


def test_peer_check_runs_lightly_on_our_encoder(tmp_path):
    pytest.importorskip("lightly")  # an optional extra of benchmarks/: absent in CI
    result = run_script("benchmarks/peer_lightly.py", "--method", "moco_v2", "--data", "shapes:32:192:64",
                        "--steps-scale", "0.004", "--set", "optimizer=sgd", "base_lr=1", "--linear-epochs", "1",
                        "--threads", "2", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    row = json.load(open(tmp_path / "moco_v2_seed0" / "row.json"))
    assert row["peer"] == "lightly" and row["steps"] == 6 and set(row["linear"]) == {"random_init", "trained"}
