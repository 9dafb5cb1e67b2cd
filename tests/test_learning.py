"""Every method learns: each method's recipe of benchmarks/learning.py (vit_nano at 32 px, batch 64, 5000
images) at 0.3 of its step budget (468 steps; MAE 1170) beats the same architecture at random init on its
paper's readout: the linear probe (probe.py) for the contrastive and self-distillation methods,
fine-tuning for MAE (probe.py's MAE recipe, 780 steps, from MAE vs from its random init).

The random init is the script's own (the benchmark checks that its k-NN equals the script's epoch-0
k-NN), so the gain is what training added. The default suite runs seed 0 of every method against the
issue's bar (5 points; MAE 3); measured with 3 seeds on 2 CPU cores (benchmarks/results/), linear-probe
gains: SimCLR +24.3 ± 1.6, MoCo v3 +15.1 ± 3.2, MoCo v2 +14.6 ± 3.1, BYOL +12.7 ± 1.2, SimSiam
+11.2 ± 1.1, DINO +14.9 ± 2.5; MAE fine-tuned +14.8 ± 3.8; and within 3 points of these (MAE +16.1
± 1.2) on a second setting, 2000 train images (README's "Does it learn?"). The `slow` test
runs 3 seeds of every method on both settings and also asks for a gain above 2 seed std:
`python -m pytest -m slow` (about 5 h on 2 cores)."""
import pytest

from benchmarks import learning

BAR = {method: 3.0 if method == "mae" else 5.0 for method in learning.RECIPES}


def readout_of(method):
    return "finetune" if method == "mae" else "linear"


def benchmark_args(tmp_path, *extra):
    return learning.get_args_parser().parse_args(["--steps-scale", "0.3", "--threads", "2", "--output-dir", str(tmp_path), *extra])


@pytest.mark.parametrize("method", list(learning.RECIPES))
def test_beats_its_random_init(method, tmp_path):
    row = learning.benchmark_one(method, 0, benchmark_args(tmp_path))
    assert row["init_matches_log"], row["knn"]  # the baseline is the encoder the run started from
    readout = row[readout_of(method)]
    gain = readout["trained"] - readout["random_init"]
    print(f"{method}: {readout_of(method)} {readout['random_init']:.1f} -> {readout['trained']:.1f} ({gain:+.1f}); "
          f"k-NN {row['knn']['random_init']:.1f} -> {row['knn']['trained']:.1f}")
    assert gain >= BAR[method], (method, readout, row["knn"])


@pytest.mark.slow
@pytest.mark.parametrize("data", ["shapes:32:5000:2000", "shapes:32:2000:2000"])  # the recipes were tuned on the first only
@pytest.mark.parametrize("method", list(learning.RECIPES))
def test_beats_its_random_init_by_more_than_two_seed_std(method, data, tmp_path):
    args = benchmark_args(tmp_path, "--seeds", "0", "1", "2", "--data", data)
    summary = learning.summarize([learning.benchmark_one(method, seed, args) for seed in args.seeds])[method]
    result = summary["readouts"][readout_of(method)]
    print(method, result)
    ratio = result["gain_over_std"]  # None: the seeds' gains are equal (std 0)
    assert result["gain"] >= BAR[method] and (ratio is None or ratio > 2), result
