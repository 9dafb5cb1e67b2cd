"""Peer check for benchmarks/learning.py: the same run built from the `lightly` package's pieces.

When one of our methods does not beat its random init, is it our bug or the recipe / budget? This
script trains the *same* encoder (built by our script from the benchmark recipe's flags and seed, so
the same random init and the same frozen parts) for the same steps, batch, optimizer, lr schedule and
momentum, but with lightly's heads, loss, momentum update and augmentations. Both are read out the
same way (learning.py's k-NN and probe.py's linear probe). If lightly learns and ours does not, the
difference is ours to find.

    pip install lightly                    # an optional extra of benchmarks/ only, never of the method files
    python benchmarks/peer_lightly.py --method moco_v2 --seeds 0 1 2 --steps-scale 0.3 --threads 1
    python benchmarks/peer_lightly.py --method simsiam --seeds 0 --set base_lr=0.5   # a recipe flag changed

Output: OUTPUT_DIR/METHOD_seedS/row.json (the same fields as learning.py's rows) and a printed table.
"""
import argparse
import copy
import importlib
import json
import os
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import learning  # noqa: E402


def lightly_or_exit():
    try:
        import lightly  # noqa: F401
    except ImportError:
        sys.exit("peer_lightly.py: error: the lightly package is not installed (pip install lightly); "
                 "it is an optional extra of benchmarks/ only")


# ----------------------------------------------------------------------------- the peers
# Each builds (trainable modules, transform, step(encoder, views, step, total) -> loss, after_step).
def moco_v2(encoder, args):
    """lightly's MoCo v2 (examples/pytorch/moco.py): MoCoProjectionHead (2 layers, no BN), NTXentLoss with a
    memory bank of keys as negatives, update_momentum on backbone and head."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.transforms import MoCoV2Transform
    head = MoCoProjectionHead(encoder.embed_dim, args.proj_hidden, args.proj_dim)
    key_encoder, key_head = copy.deepcopy(encoder).requires_grad_(False), copy.deepcopy(head).requires_grad_(False)
    criterion = NTXentLoss(temperature=args.temperature, memory_bank_size=(args.queue_size, args.proj_dim))

    def step(views):
        query = head(encoder(views[0]))
        with torch.no_grad():
            key = key_head(key_encoder(views[1]))
        return criterion(query, key)

    def after_step():
        update_momentum(encoder, key_encoder, args.momentum)
        update_momentum(head, key_head, args.momentum)
    transform = MoCoV2Transform(input_size=args.image_size, min_scale=args.crop_min)
    return nn.ModuleList([encoder, head]), transform, step, after_step


def simsiam(encoder, args):
    """lightly's SimSiam (examples/pytorch/simsiam.py): SimSiamProjectionHead (3 layers, BN), SimSiamPredictionHead,
    symmetric negative cosine similarity with stop-gradient on the projections."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
    from lightly.transforms import SimSiamTransform
    projector = SimSiamProjectionHead(encoder.embed_dim, args.proj_hidden, args.proj_dim)
    predictor = SimSiamPredictionHead(args.proj_dim, args.pred_hidden, args.proj_dim)
    criterion = NegativeCosineSimilarity()

    def step(views):
        z0, z1 = projector(encoder(views[0])), projector(encoder(views[1]))
        p0, p1 = predictor(z0), predictor(z1)
        return 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach()))
    transform = SimSiamTransform(input_size=args.image_size, min_scale=args.crop_scale[0] if args.crop_scale else 0.2)
    return nn.ModuleList([encoder, projector, predictor]), transform, step, lambda: None


PEERS = {"moco_v2": moco_v2, "simsiam": simsiam}


# ----------------------------------------------------------------------------- one run
def train_peer(method, seed, opts):
    out = os.path.abspath(os.path.join(opts.output_dir, f"{method}_seed{seed}"))
    os.makedirs(out, exist_ok=True)
    argv, steps, epochs = learning.method_command(method, opts.data, seed, opts.steps_scale, os.path.join(out, "ours"),
                                                  opts.set)
    module = importlib.import_module(argv[0][:-3])
    args = module.get_args_parser().parse_args(argv[1:])
    args.image_size = args.image_size or common.default_image_size(args.data)
    init_path = os.path.join(out, "random_init.pth")
    learning.random_init_checkpoint(method, argv, init_path)  # our script's random encoder for this seed
    torch.manual_seed(seed)
    encoder = module.build_model(args).encoder  # the same one: same flags, same seed, same build

    model, transform, step_fn, after_step = PEERS[method](encoder, args)
    dataset = common.build_dataset(args.data, "pretrain", transform)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=generator, num_workers=0)
    lr = args.base_lr * args.batch_size / 256
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":  # as our scripts: every parameter decayed
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=args.weight_decay)
    elif args.optimizer == "sgd":
        optimizer = torch.optim.SGD(trainable, lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        sys.exit(f"peer_lightly.py: error: {method}'s recipe uses {args.optimizer}; only SGD and AdamW are wired here")
    total, warmup = epochs * len(loader), args.warmup_epochs * len(loader)
    print(f"== lightly {method}, seed {seed}: {total} steps, lr {lr:g}, $ python {' '.join(argv)}", flush=True)
    start, done, log = time.time(), 0, []
    model.train()
    for epoch in range(epochs):
        losses = []
        for views, _ in loader:
            # per step, as our v3 / BYOL / DINO; our v2 and SimSiam move it per epoch
            for group in optimizer.param_groups:
                group["lr"] = common.cosine_schedule(done, total, lr, 0.0, warmup)
            loss = step_fn(views)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            after_step()
            losses.append(loss.item())
            done += 1
        log.append(dict(epoch=epoch + 1, loss=sum(losses) / len(losses)))
        print(f"  epoch {epoch + 1}/{epochs} loss {log[-1]['loss']:.4f}", flush=True)
    trained_path = os.path.join(out, "lightly.pth")
    common.save_checkpoint(dict(method=argv[0][:-3], encoder_config=dict(arch=args.arch, image_size=args.image_size,
                                                                          patch_size=args.patch_size),
                                encoder=encoder.state_dict(), args=vars(args), epoch=epochs, step=done), trained_path)
    row = dict(method=method, seed=seed, steps=done, peer="lightly", command="python " + " ".join(argv),
               train_seconds=round(time.time() - start, 1), log=log)
    row["knn"] = dict(random_init=learning.knn_top1(init_path, args.data),
                      trained=learning.knn_top1(trained_path, args.data))
    row["linear"] = {name: learning.probe(path, args.data, "linear", os.path.join(out, f"linear_{name}.json"), opts)
                     for name, path in (("random_init", init_path), ("trained", trained_path))}
    for readout in ("knn", "linear"):
        print(f"  {readout:<7} random init {row[readout]['random_init']:6.2f}  lightly {row[readout]['trained']:6.2f}"
              f"  gain {row[readout]['trained'] - row[readout]['random_init']:+6.2f}", flush=True)
    with open(os.path.join(out, "row.json"), "w") as f:
        json.dump(row, f, indent=1)
    return row


def main():
    p = argparse.ArgumentParser("peer_lightly.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", required=True, choices=list(PEERS), help="the method to rebuild from lightly's pieces")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per seed (the random init follows it)")
    p.add_argument("--data", default="shapes:32:5000:2000", help="as learning.py's --data")
    p.add_argument("--steps-scale", type=float, default=1.0, help="as learning.py's")
    p.add_argument("--set", nargs="+", default=[], type=learning.recipe_override, metavar="NAME=VALUE",
                   help="as learning.py's: replace a recipe flag, e.g. base_lr=0.5 momentum=0.999")
    p.add_argument("--linear-epochs", type=common.positive_int, default=None,
                   help="probe.py --linear-epochs (default: probe.py's)")
    p.add_argument("--threads", type=common.positive_int, default=2, help="torch threads of the run and its readouts")
    p.add_argument("--output-dir", default="runs/peer_lightly", help="METHOD_seedS/row.json and checkpoints go here")
    opts = p.parse_args()
    lightly_or_exit()
    torch.set_num_threads(opts.threads)
    opts.output_dir = os.path.abspath(opts.output_dir)
    os.chdir(ROOT)
    rows = [train_peer(opts.method, seed, opts) for seed in opts.seeds]
    for readout in ("knn", "linear"):
        gains = [r[readout]["trained"] - r[readout]["random_init"] for r in rows]
        mean, std = learning.mean_std(gains)
        print(f"{opts.method} (lightly) {readout}: gains {' '.join(f'{g:+.1f}' for g in gains)}; mean {mean:+.1f}"
              + (f" ± {std:.1f}" if std is not None else ""))


if __name__ == "__main__":
    main()
