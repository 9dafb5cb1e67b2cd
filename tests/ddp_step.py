"""One training step of a method, run alone or under torchrun; rank 0 saves the loss and gradients.

    python tests/ddp_step.py simclr OUT.pt                                    # one process, 2B images
    torchrun --nproc_per_node=2 tests/ddp_step.py simclr OUT.pt               # 2 ranks x B images
The method module must expose get_args_parser(), build_model(args) and training_step(model, views, args, **kw)
(kw: MAE's `noise`); training_step returns (loss, ...).
"""
import importlib
import os
import sys

import torch
import torch.nn as nn

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import common  # noqa: E402
from helpers import end_ranks  # noqa: E402

method, out_path, *flags = sys.argv[1:]
module = importlib.import_module(method)
dist_env = common.init_distributed()
args = module.get_args_parser().parse_args(["--data", "shapes", "--image-size", "32", *flags])
torch.manual_seed(0)
model = module.build_model(args)
global_batch = 8
per_rank = global_batch // dist_env.world_size
mine = slice(dist_env.rank * per_rank, (dist_env.rank + 1) * per_rank)  # this rank's images
# Every random input is drawn for the global batch and sliced, so 1 process and 2 ranks see the same
# numbers: the views (DINO: 2 global crops + 2 local crops; MAE: one view) and MAE's masking noise.
generator = torch.Generator().manual_seed(1)
view_sizes = {"dino": [32, 32, 16, 16], "mae": [32]}.get(method, [32, 32])
views = [torch.randn(global_batch, 3, size, size, generator=generator) for size in view_sizes]
local_views = [view[mine] for view in views]
step_kwargs = {}
if method == "mae":
    step_kwargs["noise"] = torch.rand(global_batch, (32 // args.patch_size) ** 2, generator=generator)[mine]
raw_model = model
if dist_env.world_size > 1:
    model = nn.parallel.DistributedDataParallel(model)
    raw_model = model.module
# BN in eval mode (running statistics, identical everywhere): torch's SyncBatchNorm only runs on
# CUDA, so on gloo this step checks our part of the equivalence exactly: the gather with gradients,
# the loss over the global batch and DDP's gradient averaging.
model.eval()
loss = module.training_step(model, local_views, args, **step_kwargs)[0]
loss.backward()
# A rank's loss is the mean over its own images (MoCo's queries, BYOL / SimSiam / MAE / DINO) or
# already the global batch's (SimCLR): averaged over ranks it is the global-batch loss either way.
global_loss = loss.detach().clone()
if dist_env.world_size > 1:
    torch.distributed.all_reduce(global_loss)
    global_loss /= dist_env.world_size
if dist_env.is_main:
    torch.save({"loss": global_loss,
                "grads": {n: p.grad for n, p in raw_model.named_parameters() if p.grad is not None}},
               out_path)
# Every rank's buffers: what a step updates in place on each rank (DINO's centre) must agree across ranks.
torch.save(dict(raw_model.named_buffers()), f"{out_path}.buffers{dist_env.rank}")
if __name__ == "__main__":  # a test that runs this file under another name saves more, then ends the ranks itself
    end_ranks(dist_env.world_size)
