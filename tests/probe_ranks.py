"""What each of 2 gloo ranks does in probe.py under torchrun; rank r saves OUT.rank<r>:

    torchrun --nproc_per_node=2 tests/probe_ranks.py CHECKPOINT OUT PROBE_FLAGS...

1. probe.main with PROBE_FLAGS and --plot (its JSON: OUT.json), the plot on rank 0 waiting for rank 1 to leave main:
   a rank held in a collective while rank 0 plots (NCCL's watchdog would abort it) hangs it instead;
2. the key gather (common.all_gather, no gradient) of a channels_last batch, 2 images per rank;
3. fine-tuning (MAE recipe, from scratch) and the linear probe with --augment on one image repeated, so that the
   batches of the two ranks differ only by their random views: the first batch each trained on, and the weights
   each built.
"""
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import probe  # noqa: E402
import weights  # noqa: E402
from helpers import end_ranks  # noqa: E402

checkpoint, out, *flags = sys.argv[1:]


# 1. Rank 1 marks that it has left main; rank 0's plot waits for that mark.
def plot_once_rank_1_is_gone(*_):
    deadline = time.time() + 30
    while not os.path.exists(f"{out}.left_main"):
        assert time.time() < deadline, "rank 1 did not leave probe.main while rank 0 plotted"
        time.sleep(0.05)
    saved["plotted"] = True


saved, probe.plot = {}, plot_once_rank_1_is_gone
sys.modules.setdefault("matplotlib", types.ModuleType("matplotlib"))  # main checks the import; the plot is a stub
probe.main(probe.get_args_parser().parse_args([checkpoint, *flags, "--plot", "pca", "--output", out + ".json"]))
dist_env = common.DistEnv(torch.distributed.get_rank(), torch.distributed.get_world_size())  # main's process group
if dist_env.rank == 1:
    open(f"{out}.left_main", "w").close()

# 2. The global batch (4, 3, 2, 2); this rank's 2 images in channels_last, as a ResNet's on CUDA.
batch = torch.arange(48.0).view(4, 3, 2, 2)
mine = batch[2 * dist_env.rank:2 * dist_env.rank + 2].contiguous(memory_format=torch.channels_last)
saved["gathered"] = common.all_gather(mine, keep_grad=False)

# 3. One training image 8 times; a step sees each rank's 4 of the global batch of 8.
args = probe.get_args_parser().parse_args([checkpoint, "--data", "shapes:16:8:8", "--seeds", "1", "--workers", "0",
                                           "--finetune-epochs", "1", "--finetune-batch-size", "8", "--linear-epochs",
                                           "1", "--linear-batch-size", "8", "--augment"])
encoder, image_size = weights.load_encoder(args)  # as main: args gets the run's normalisation
one_image = lambda views: torch.utils.data.Subset(common.build_dataset("shapes:16:8:8", "train", views), [0] * 8)
val_set = common.build_dataset("shapes:16:8:8", "val", common.eval_transform(16, args.mean, args.std))


class Built(weights.Classifier):  # the weights this rank builds, before DDP would copy rank 0's over them
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        saved["built"] = {n: p.detach().clone() for n, p in self.named_parameters()}


def first_step(model, optimizer, images, targets, step=probe.finetune_step):
    saved.setdefault("finetune_images", images)  # crops, flips, RandAugment, erasing, then MixUp / CutMix
    return step(model, optimizer, images, targets)


weights.Classifier, probe.finetune_step = Built, first_step
# Of the labels, run_finetune reads only their number and the classes (10); the targets are the image's label.
probe.run_finetune(args, one_image(probe.train_augmentation(image_size, args, rand_augment=True)),
                   torch.full((8,), 9), {"val": val_set}, dist_env, "mae", dict(fraction=1.0), scratch=True)
readout = weights.Readout(encoder)
readout.register_forward_pre_hook(lambda module, inputs: saved.setdefault("linear_images", inputs[0]))
probe.linear_on_the_fly(readout, one_image(probe.train_augmentation(image_size, args)), args, 10, dist_env)(
    torch.arange(8), 0.1, 0)
torch.save(saved, f"{out}.rank{dist_env.rank}")
end_ranks(dist_env.world_size)
