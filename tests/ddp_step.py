"""One training step of a method, run alone or under torchrun; rank 0 saves the loss and gradients.

    python tests/ddp_step.py simclr OUT.pt                                    # one process, 2B images
    torchrun --nproc_per_node=2 tests/ddp_step.py simclr OUT.pt               # 2 ranks x B images
The method module must expose get_args_parser(), build_model(args) and training_step(model, views, args).
"""
import importlib
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

method, out_path, *flags = sys.argv[1:]
module = importlib.import_module(method)
dist_env = common.init_distributed()
args = module.get_args_parser().parse_args(["--data", "shapes", "--image-size", "32", *flags])
torch.manual_seed(0)
model = module.build_model(args)
global_batch = 8
views = torch.randn(2, global_batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (view, image, C, H, W)
per_rank = global_batch // dist_env.world_size
local_views = list(views[:, dist_env.rank * per_rank:(dist_env.rank + 1) * per_rank])
raw_model = model
if dist_env.world_size > 1:
    model = nn.parallel.DistributedDataParallel(model)
    raw_model = model.module
# BN in eval mode (running statistics, identical everywhere): torch's SyncBatchNorm only runs on
# CUDA, so on gloo this step checks our part of the equivalence exactly: the gather with gradients,
# the loss over the global batch and DDP's gradient averaging.
model.eval()
loss = module.training_step(model, local_views, args)[0]
loss.backward()
if dist_env.is_main:
    torch.save({"loss": loss.detach(), "grads": {n: p.grad for n, p in raw_model.named_parameters() if p.grad is not None}},
               out_path)
