"""make_loader's in-memory decision under torchrun, each rank seeing its own free memory: for each case FREE_0,FREE_1
(bytes, rank 0's and rank 1's) rank 0 saves the loader that every rank chose and, where it is a DeviceLoader, whether
it holds the dataset's images and labels in order (each rank decodes a slice, the ranks gather them). A last case has
a corrupt image in rank 1's slice: rank 0 saves the error that every rank stopped with.

    torchrun --nproc_per_node=2 tests/in_memory_ranks.py OUT.json 1e12,1e3 1e12,1e12
"""
import json
import os
import sys

import torch
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import device_views  # noqa: E402
import shapes  # noqa: E402
from helpers import end_ranks  # noqa: E402


class Corrupt(shapes.Shapes):
    def __getitem__(self, index):
        if index == 8:  # in rank 1's slice (images 5 to 8)
            raise common.UserError("cannot read image 8.png: truncated")
        return super().__getitem__(index)


out_path, cases = sys.argv[1], [[float(v) for v in case.split(",")] for case in sys.argv[2:]]
dist_env = common.init_distributed()
dataset = shapes.Shapes("train", 8, 9, common.MultiView([common.View(8)]))  # 9 images: uneven slices
raw = [(v2.functional.pil_to_tensor(image), label) for image, label in (shapes.Shapes("train", 8)[i] for i in range(9))]
chosen = []
for free in cases:
    device_views.free_memory = lambda device, free=free: free[dist_env.rank]
    loader = common.make_loader(dataset, 2, dist_env, workers=0)
    same_data = isinstance(loader, device_views.DeviceLoader) and len(loader.images) == len(raw) and all(
        torch.equal(loader.images[i], image) and loader.labels[i] == label for i, (image, label) in enumerate(raw))
    chosen.append(dict(loader=type(loader).__name__, same_data=same_data))
try:
    common.make_loader(Corrupt("train", 8, 9, dataset.transform), 2, dist_env, workers=0)
    chosen.append(dict(error=None))
except common.UserError as error:
    chosen.append(dict(error=str(error)))
everyone = [None] * dist_env.world_size
torch.distributed.all_gather_object(everyone, chosen)
if dist_env.is_main:
    json.dump(everyone, open(out_path, "w"))
end_ranks(dist_env.world_size)
