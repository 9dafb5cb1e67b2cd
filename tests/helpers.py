"""Shared test plumbing: run a script as a user would, and compare one DDP step with one process."""
import copy
import json
import os
import runpy
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*argv, timeout=600, threads=1):
    """Run `python ARGV...` from the repository root; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def short_run(method, flags, tmp_path):
    """Train METHOD.py as a user would (FLAGS log the k-NN at epoch 0 and at the end); returns its
    log records, its checkpoint with the encoder loaded back strictly (as probe.py does), its stdout."""
    import common

    result = run_script(f"{method}.py", *flags, "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    print(f"{method}: k-NN top-1 random init {log[0]['knn_top1']:.4f} -> trained {log[-1]['knn_top1']:.4f}")
    assert "k-NN top-1 (k=20) on the val split" in result.stdout
    checkpoint = common.load_checkpoint(str(tmp_path / "checkpoint.pth"), method)
    common.build_encoder(**checkpoint["encoder_config"]).load_state_dict(checkpoint["encoder"])
    return log, checkpoint, result.stdout


def end_ranks(world_size):
    """The last line of a torchrun test script: every rank waits for rank 0's writes, shuts gloo down and exits
    without the interpreter's teardown. There, now and then under load (ddp_step.py, sync_bn_step.py: about once in
    ten suite runs), what the script's module still held (a DDP reducer, kernels registered from Python) was
    destroyed beside gloo's threads and a rank aborted ("terminate called without an active exception", SIGABRT)
    after every check had passed. One process (world_size 1, run in pytest's process) returns."""
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)


def one_process_and_two_ranks(script, method, tmp_path, *flags):
    """SCRIPT METHOD OUT FLAGS... in this process (no second torch import to wait for), then on 2 gloo ranks under
    torchrun; returns the two OUT paths (tests/ddp_step.py saves a step's loss and gradients there)."""
    single, ddp = str(tmp_path / "single.pt"), str(tmp_path / "ddp.pt")
    saved_argv, saved_cwd, sys.argv = sys.argv, os.getcwd(), [script, method, single, *flags]
    os.chdir(ROOT)
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, method, ddp,
                        *flags, threads=1)
    assert result.returncode == 0, result.stderr
    return single, ddp


def ddp_vs_single_process(method, tmp_path, *flags):
    """Loss and gradients of one step: 2 gloo ranks x 4 images vs 1 process x 8 images."""
    single, ddp = one_process_and_two_ranks(os.path.join(ROOT, "tests", "ddp_step.py"), method, tmp_path, *flags)
    return torch.load(single), torch.load(ddp)


def assert_same_step(single, ddp, atol=1e-5):
    torch.testing.assert_close(ddp["loss"], single["loss"], atol=atol, rtol=1e-5)
    assert single["grads"].keys() == ddp["grads"].keys()
    for name, grad in single["grads"].items():
        torch.testing.assert_close(ddp["grads"][name], grad, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def error_line(result):
    """A user error is one line on stderr and exit code 1/2, never a traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "it/s" not in line and "%|" not in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


def straight_and_preempted(module, flags, tmp_path, monkeypatch):
    """Train twice in-process: straight through, and killed right after its first checkpoint then
    auto-resumed by running the same command again. Returns the three checkpoints (straight, at the
    kill, resumed) for the caller to compare."""
    import pytest

    import common

    run = lambda out: module.main(module.get_args_parser().parse_args(flags + ["--output-dir", str(out)]))  # noqa: E731
    run(tmp_path / "straight")
    real_save = common.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(common, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "preempted")
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    at_kill = torch.load(tmp_path / "preempted" / "checkpoint.pth", weights_only=False)
    run(tmp_path / "preempted")
    load = lambda out: torch.load(tmp_path / out / "checkpoint.pth", weights_only=False)  # noqa: E731
    return load("straight"), at_kill, load("preempted")


def assert_same_state(a, b):
    """Bit-identical model state (every parameter and buffer: target networks, queues, centres)."""
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


def moved_online_and_its_ema(online, momentum_update, momentum=0.9):
    """The network a target / key encoder / teacher must equal once the online weights have moved. At init the
    two sides are equal, so a target that reads the online network passes any check made there. Here the online
    weights (`online`: the method's averaged parts, e.g. nn.Sequential(encoder, projector)) move by noise, the
    method's own momentum_update(momentum) runs, and the EMA is computed by hand from a copy of the starting
    weights, name by name: ξ = m·ξ0 + (1 − m)·θ. Returns it in eval mode (BN running statistics)."""
    ema = copy.deepcopy(online)  # ξ0: the target side starts equal to the online network
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.05 * torch.randn_like(p))
    momentum_update(momentum)
    theta = dict(online.named_parameters())
    with torch.no_grad():
        for name, xi in ema.named_parameters():
            xi.copy_(momentum * xi + (1 - momentum) * theta[name])
    return ema.eval()
