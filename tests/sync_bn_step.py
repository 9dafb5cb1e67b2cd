"""Two training steps of device_views.SyncBatchNorm on 2 gloo ranks against nn.BatchNorm on the global batch; exits 0 if
they agree and no step read the device from the host.

    torchrun --nproc_per_node=2 tests/sync_bn_step.py
The five batch_norm_* ops the layer calls (torch's SyncBatchNorm's) have CUDA kernels only: on CPU they get the
reference math below, written from the CUDA kernels (aten/src/ATen/native/cuda/Normalization.cuh), so that every
other line the layer runs on CUDA, its gather, its bookkeeping and torch's backward, runs here as it is.
"""
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import device_views  # noqa: E402
from helpers import end_ranks  # noqa: E402


def dims(x):  # all but the channels
    return [0, *range(2, x.dim())]


def per_channel(t, x):  # (C,) -> broadcastable against x (N, C, ...)
    return t.view(1, -1, *[1] * (x.dim() - 2))


def stats(x, eps):  # this rank's mean and 1/sqrt(biased var + eps)
    var, mean = torch.var_mean(x, dims(x), correction=0)
    return mean, (var + eps).rsqrt()


def gather_stats(x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts):
    n = counts[:, None]  # (ranks, 1): pooled mean and biased var of the ranks' batches
    mean = (n * mean_all).sum(0) / n.sum()
    var = (n * (invstd_all.pow(-2) - eps + (mean_all - mean) ** 2)).sum(0) / n.sum()
    if running_mean is not None:
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(var * n.sum() / (n.sum() - 1), momentum)  # the unbiased variance
    return mean, (var + eps).rsqrt()


def elemt(x, weight, bias, mean, invstd, eps):
    return (x - per_channel(mean, x)) * per_channel(invstd * weight, x) + per_channel(bias, x)


def backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
    sum_dy, sum_dy_xmu = dy.sum(dims(x)), (dy * (x - per_channel(mean, x))).sum(dims(x))
    return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd, sum_dy  # and the grads of weight and bias


def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    n = count.sum()  # sum_dy, sum_dy_xmu: over the global batch
    projection = (x - per_channel(mean, x)) * per_channel(invstd ** 2 * sum_dy_xmu / n, x)
    return (dy - per_channel(sum_dy / n, x) - projection) * per_channel(invstd * weight, x)


class HostReads(TorchDispatchMode):
    """The ops whose result's value or shape only the device knows (item, bool, indexing by a mask, nonzero): on CUDA
    each one waits for the GPU."""

    def __enter__(self):
        self.ops = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape} & set(func.tags):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


kernels = torch.library.Library("aten", "IMPL")
for name, kernel in [("batch_norm_stats", stats), ("batch_norm_gather_stats_with_counts", gather_stats),
                     ("batch_norm_elemt", elemt), ("batch_norm_backward_reduce", backward_reduce),
                     ("batch_norm_backward_elemt", backward_elemt)]:
    kernels.impl(name, kernel, "CPU")

torch.set_default_dtype(torch.float64)  # a wrong formula then stands out from rounding by 10 orders of magnitude
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mine = slice(4 * rank, 4 * rank + 4)  # this rank's 4 images of the global batch of 8
torch.manual_seed(0)
reference = nn.Sequential(nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.BatchNorm1d(75))  # a ResNet's BN, a head's
for param in reference.parameters():
    nn.init.normal_(param)
layer = common.convert_sync_batchnorm(copy.deepcopy(reference))
SyncBN = device_views.SyncBatchNorm
assert [type(module) for module in layer] == [SyncBN, nn.Tanh, nn.Flatten, SyncBN]
for step in range(2):  # the second step starts from the running statistics and num_batches_tracked of the first
    x = (3 * torch.randn(8, 3, 5, 5) + 1).requires_grad_()  # the global batch, its mean far from 0
    dy = torch.randn(8, 75)  # the gradient of the output
    x_mine = x.detach()[mine].requires_grad_()
    with HostReads() as reads:
        y = layer(x_mine)
        y.backward(dy[mine])
    assert reads.ops == [], reads.ops
    expected = reference(x)
    expected.backward(dy)
    assert_close(y, expected[mine])
    assert_close(x_mine.grad, x.grad[mine])
    for name, param in layer.named_parameters():  # each rank's share; DDP sums them
        dist.all_reduce(param.grad)
        assert_close(param.grad, reference.get_parameter(name).grad)
    for name, buffer in layer.named_buffers():  # running_mean, running_var, num_batches_tracked
        assert_close(buffer, reference.get_buffer(name))
    layer.zero_grad(), reference.zero_grad()
layer.eval(), reference.eval()
assert_close(layer(x_mine), reference(x)[mine])  # the running statistics, on torch's path

# The check catches torch's own Function: its mask (without CUDA no graph capture can skip it).
with HostReads() as reads:
    torch.nn.modules._functions.SyncBatchNorm.apply(x_mine, layer[0].weight, layer[0].bias, None, None, 1e-5, 0.1,
                                                    dist.group.WORLD, world)
assert "aten.index.Tensor" in reads.ops, reads.ops
end_ranks(world)
