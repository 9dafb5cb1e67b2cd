"""Suite plumbing. The learning runs (tests/test_learning.py) are the benchmark's own commands, minutes each: they start
with the session, two at a time in the background on one thread each, while every other test runs beside them on
one thread too (two threads per process on two busy cores mostly wait for each other). Their tests come last."""
import concurrent.futures
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the method files are scripts at the top level, not a package
LEARNING_TEST = "test_beats_its_random_init"
# CPU minutes of each method's run on one thread (training and readouts): the longest start first.
LEARNING_COST = {"mae": 14, "dino": 5, "moco_v3": 5, "byol": 4, "moco_v2": 4, "simsiam": 4, "simclr": 3}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.originalname == LEARNING_TEST)  # stable: the others keep their order


class Background:
    """Commands run two at a time in subprocesses of one thread each; result(name) waits for one and returns its
    output folder."""

    def __init__(self, folder):
        self.folder, self.pool, self.jobs, self.processes = folder, concurrent.futures.ThreadPoolExecutor(2), {}, []

    def submit(self, name, argv):
        self.jobs[name] = self.pool.submit(self.run, name, argv)

    def run(self, name, argv):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(self.folder / f"{name}.log", "w") as log:
            process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
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
                process.kill()


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """Seed 0 of every method whose learning test is selected, as `python benchmarks/learning.py --methods M
    --threads 1` runs it; and this process on one thread."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("background")
    jobs = Background(folder)
    selected = {item.callspec.params["method"] for item in request.session.items if item.originalname == LEARNING_TEST}
    for method in sorted(selected, key=lambda m: -LEARNING_COST[m]):  # MAE's long run beside the queue of the others
        jobs.submit(method, ["benchmarks/learning.py", "--methods", method, "--seeds", "0", "--steps-scale", "0.3",
                             "--threads", "1", "--output-dir", str(folder / method)])
    yield jobs
    jobs.stop()


@pytest.fixture
def benchmark_row(background):
    """benchmark_row(method): the row.json of that method's background run, plus its training log and folder."""
    def row(method):
        out = background.result(method) / f"{method}_seed0"
        result = json.load(open(out / "row.json"))
        result["log"] = [json.loads(line) for line in open(out / "train" / "log.jsonl")]
        result["folder"] = out
        return result
    return row
