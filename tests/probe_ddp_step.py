"""One fine-tune step of probe.py (MAE recipe: global pool, fc_norm, soft targets, layer decay), run
alone or under torchrun; rank 0 saves the loss, the gradients and the parameters after the step.

    python tests/probe_ddp_step.py OUT.pt                                   # one process, 8 images
    torchrun --nproc_per_node=2 tests/probe_ddp_step.py OUT.pt              # 2 ranks x 4 images
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import probe  # noqa: E402
import weights  # noqa: E402
from helpers import end_ranks  # noqa: E402

out_path = sys.argv[1]
dist_env = common.init_distributed()
torch.manual_seed(0)
model = weights.Classifier(common.build_encoder("vit_nano", 16, 8), num_classes=10, global_pool=True)
optimizer = torch.optim.AdamW(probe.finetune_param_groups(model.encoder, model.head, 0.65, 0.05), lr=1e-3)
generator = torch.Generator().manual_seed(1)
images = torch.randn(8, 3, 16, 16, generator=generator)
targets = torch.randn(8, 10, generator=generator).softmax(1)  # soft, as MixUp / CutMix make them
mine = slice(dist_env.rank * 8 // dist_env.world_size, (dist_env.rank + 1) * 8 // dist_env.world_size)
trained = torch.nn.parallel.DistributedDataParallel(model) if dist_env.world_size > 1 else model
loss = probe.finetune_step(trained, optimizer, images[mine], targets[mine])
if dist_env.world_size > 1:
    torch.distributed.all_reduce(loss)  # the mean of the ranks' means: the global batch's loss
    loss /= dist_env.world_size
if dist_env.is_main:
    torch.save({"loss": loss, "grads": {n: p.grad for n, p in model.named_parameters()},
                "params": {n: p.detach() for n, p in model.named_parameters()}}, out_path)
end_ranks(dist_env.world_size)
