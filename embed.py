"""Features of a folder of images from any saved encoder, for retrieval, de-duplication, clustering or a linear head
in production; with --neighbours, each query image's nearest images (cosine).

    python embed.py runs/dino/checkpoint.pth --data /photos --output photos.npz
    python embed.py resnet50.pth --arch resnet50 --data /photos --output photos.npz   # a plain state_dict
    python embed.py runs/dino/checkpoint.pth --data /photos --output photos.npz --neighbours 5 --query /new
    python embed.py runs/dino/checkpoint.pth --head probe_out/linear.pth --data /new --output predictions.csv
    torchrun --nproc_per_node=8 embed.py runs/dino/checkpoint.pth --data /photos --output photos.npz

OUT.npz holds `features` (N, D) float32, probe.py's readout (default: a ViT's CLS token after the final norm, a
ResNet's pooled features), `paths` relative to the folder read (DIR, or DIR/train), and `labels` + `classes` where
DIR has class folders. Images are read as probe.py reads them (the run's resolution and normalisation, a bicubic
resize and centre crop). With --head (a model probe.py --save kept), OUT is a CSV of predictions instead.
"""
import argparse
import csv
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
import weights


def get_args_parser():
    p = argparse.ArgumentParser("embed.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    weights.encoder_args(p)  # the checkpoint, --arch, --image-size, --mean, --std, --n-last-blocks, ...: as probe.py
    add = p.add_argument_group("images").add_argument
    add("--data", required=True, help="a folder: DIR/<class>/* (labelled), images at any depth without class folders "
        "(unlabelled), or DIR/{train,val}/<class>/* (its train/ split; pass DIR/val for the other)")
    add("--output", required=True, help="the .npz to write (with --head: the .csv of predictions)")
    add("--head", default=None, help="a model probe.py --save kept (linear.pth, finetune.pth): write each image's "
        "predicted class, its probability and the top 5 (and its label, where DIR has class folders) as CSV")
    add("--skip-bad-images", action="store_true", help="leave unreadable images out, and say how many (default: stop "
        "with one line naming the file)")
    add("--neighbours", type=common.positive_int, default=0, help="the K nearest images of DIR for each query image, "
        "written to OUTPUT's name + _neighbours.csv (query, rank, neighbour, cosine)")
    add("--query", default=None, help="the query images' folder (default: DIR itself, an image not its own neighbour)")
    return p


def embed_folder(folder, readout, transform, args, dist_env):
    """(features (N, D), paths relative to folder, the dataset) of every readable image of folder, every rank."""
    dataset = common.folder_dataset(folder, "train", transform, args.skip_bad_images)
    features, _ = weights.embed_split(readout, dataset, args, dist_env, f"embedding {folder}")
    bad = dataset.bad.to(features.device, torch.uint8)  # --skip-bad-images: replaced by the next image, left out
    if dist_env.world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # each rank knows only its shard's
    keep = ~bad.bool()
    if dist_env.is_main and not keep.all():
        print(f"{folder}: left out {int((~keep).sum())} unreadable images")
    paths = [os.path.relpath(path, dataset.root) for path, _ in dataset.samples]  # root: DIR, or DIR/train
    return features[keep], [path for path, kept in zip(paths, keep.tolist()) if kept], dataset, keep


@torch.no_grad()
def nearest(queries, memory, k, same=False):
    """Cosine similarities and indices (Q, k) of the k memory rows nearest each query row; same: queries are memory
    and a row is not its own neighbour. In chunks: the (chunk, N) similarity matrix stays bounded."""
    memory, results, start = F.normalize(memory, dim=1), [], 0
    for chunk in F.normalize(queries, dim=1).split(1024):
        similarity = chunk @ memory.T  # (n, N)
        if same:
            rows = torch.arange(len(chunk), device=chunk.device)
            similarity[rows, start + rows] = -float("inf")
        results.append(similarity.topk(min(k, len(memory) - same), dim=1))
        start += len(chunk)
    return torch.cat([r.values for r in results]), torch.cat([r.indices for r in results])


def write_predictions(path, logits, paths, classes, labels=None):
    """path, predicted class, its probability, the top 5 as 'class:probability ...' (and the label, if known)."""
    top = logits.softmax(1).topk(min(5, len(classes)), dim=1)  # (N, 5)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["path", "predicted", "probability", "top5"] + ["label"] * (labels is not None))
        for i, (probabilities, ids) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            top5 = " ".join(f"{classes[c]}:{p:.4f}" for p, c in zip(probabilities, ids))
            label = [labels[i]] if labels is not None else []
            rows.writerow([paths[i], classes[ids[0]], f"{probabilities[0]:.6f}", top5, *label])
    print(f"predictions for {len(paths)} images written to {path}")


def main(args):
    if not os.path.isdir(args.data):
        raise common.UserError(f"--data {args.data}: no such folder")
    if args.query and not os.path.isdir(args.query):
        raise common.UserError(f"--query {args.query}: no such folder")
    if (args.query and not args.neighbours) or (args.head and args.neighbours):
        raise common.UserError("--query needs --neighbours K, and --neighbours reads features: not with --head")
    if not args.output.endswith(suffix := ".csv" if args.head else ".npz"):  # np.savez would add .npz; a checkpoint
        raise common.UserError(f"--output {args.output}: expected a {suffix} file")  # given by mistake stays intact
    saved = args.head and common.read_torch_file(args.head, "--head")
    if args.head and (not isinstance(saved, dict) or saved.get("protocol") not in ("linear", "finetune")
                      or not set(weights.HEAD_KEYS) <= set(saved)):
        raise common.UserError(f"--head {args.head}: not a model written by probe.py --save")
    if args.head:  # the pixels it was trained on, unless given
        args.image_size, args.grayscale_input = args.image_size or saved["image_size"], saved["grayscale_input"]
        args.mean, args.std = args.mean or saved["mean"], args.std or saved["std"]
    dist_env = common.init_distributed()
    encoder, image_size = weights.load_encoder(args)
    weights.check_readout(encoder, args)
    model = (weights.saved_classifier(saved, encoder, f"--head {args.head}") if args.head else
             weights.Readout(encoder, args.n_last_blocks, args.avgpool_patchtokens).eval()).to(dist_env.device)
    transform = common.eval_transform(image_size, args.mean, args.std, args.grayscale_input)
    features, paths, dataset, keep = embed_folder(args.data, model, transform, args, dist_env)
    if args.head and dist_env.is_main:
        kept = [dataset.classes[t] for t, k in zip(dataset.targets, keep.tolist()) if k]
        labels = None if dataset.unlabelled else kept  # class folders' names, as the head's classes
        write_predictions(args.output, features, paths, saved["classes"], labels)
    elif dist_env.is_main:
        arrays = dict(features=features.cpu().numpy().astype(np.float32), paths=np.array(paths))
        if not dataset.unlabelled:
            arrays.update(labels=np.array(dataset.targets)[keep.cpu().numpy()], classes=np.array(dataset.classes))
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        np.savez(args.output, **arrays)
        print(f"{len(paths)} features of dimension {features.shape[1]} written to {args.output}")
    if args.neighbours:
        queries, query_paths = (embed_folder(args.query, model, transform, args, dist_env)[:2] if args.query
                                else (features, paths))
        similarity, index = nearest(queries, features, args.neighbours, same=not args.query)
        if dist_env.is_main:
            path = os.path.splitext(args.output)[0] + "_neighbours.csv"
            with open(path, "w", newline="") as f:
                rows = csv.writer(f)
                rows.writerow(["query", "rank", "neighbour", "cosine"])
                for query, cosines, ids in zip(query_paths, similarity.tolist(), index.tolist()):
                    rows.writerows([query, rank + 1, paths[i], f"{cosine:.6f}"]
                                   for rank, (cosine, i) in enumerate(zip(cosines, ids)))
            print(f"{args.neighbours} nearest images of each of {len(query_paths)} queries written to {path}")
    if dist_env.world_size > 1:
        dist.barrier()  # rank 0 has written; shut down together


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except common.UserError as error:
        sys.exit(common.error_line("embed.py", error))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
