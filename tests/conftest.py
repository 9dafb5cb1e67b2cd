"""Suite plumbing. The long runs (every method's learning benchmark, README's quick start) start with the session, two
at a time in the background on one thread each, while every other test runs beside them on one thread too (two
threads per process on two busy cores mostly wait for each other); the tests that read them come last."""
import concurrent.futures
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the method files are scripts at the top level, not a package

# README's quick start (2 CPU cores, about a minute): SimCLR on the built-in dataset, k-NN at random init and at the end
QUICK_START = ["simclr.py", "--data", "shapes:32:1500:2000", "--arch", "vit_nano", "--patch-size", "8", "--epochs", "8",
               "--batch-size", "64", "--base-lr", "4", "--temperature", "0.2", "--warmup-epochs", "1",
               "--knn-every", "8", "--workers", "2"]
# The background runs, by name: (minutes beside the rest of the suite on 2 cores, the command given its folder).
RUNS = {"quick-start": (2, lambda out: [*QUICK_START, "--output-dir", out]),
        "quick-start-cpu-augment": (2, lambda out: [*QUICK_START, "--cpu-augment", "--output-dir", out])}
for method, minutes in dict(mae=24, moco_v3=7, dino=6, byol=3.5, simsiam=3, simclr=3, moco_v2=3).items():
    RUNS[method] = (minutes, lambda out, method=method: [  # the benchmark's seed 0, as README's table ran it
        "benchmarks/learning.py", "--methods", method, "--seeds", "0", "--steps-scale", "0.3", "--threads", "1",
        "--output-dir", out])


def runs_of(item):
    """The background runs a test reads: those its background_runs marker names, or its `method` parameter's run if
    it reads benchmark_row."""
    if marker := item.get_closest_marker("background_runs"):
        return set(marker.args)
    return {item.callspec.params["method"]} if "benchmark_row" in getattr(item, "fixturenames", ()) else set()


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: bool(runs_of(item)))  # the readers of background runs last; the others keep their order


class Background:
    """Commands run two at a time, each a subprocess of one thread; result(name) waits for one, returns its folder."""

    def __init__(self, folder):
        self.folder, self.pool, self.jobs, self.processes = folder, concurrent.futures.ThreadPoolExecutor(2), {}, []

    def submit(self, name, argv):
        self.jobs[name] = self.pool.submit(self.run, name, argv)

    def run(self, name, argv):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(self.folder / f"{name}.log", "w") as log:
            process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # a group: stop() ends its own subprocesses too
            self.processes.append(process)
            process.wait()
        tail = "".join(open(self.folder / f"{name}.log").readlines()[-20:])
        assert process.returncode == 0, f"python {' '.join(argv)} failed:\n{tail}"
        return self.folder / name

    def result(self, name):
        return self.jobs[name].result()

    def stop(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """The runs the selected tests read, started now, the longest first; and this process on one thread."""
    torch.set_num_threads(1)
    jobs = Background(tmp_path_factory.mktemp("background"))
    selected = set().union(*map(runs_of, request.session.items))
    for name in sorted(selected, key=lambda name: -RUNS[name][0]):  # MAE's long run beside the queue of the others
        jobs.submit(name, RUNS[name][1](str(jobs.folder / name)))
    yield jobs
    jobs.stop()


@pytest.fixture
def benchmark_row(background):
    """benchmark_row(method): the row.json of that method's background benchmark run, its training log and folder."""
    def row(method):
        out = background.result(method) / f"{method}_seed0"
        result = json.load(open(out / "row.json"))
        result["log"] = [json.loads(line) for line in open(out / "train" / "log.jsonl")]
        result["folder"] = out
        return result
    return row
