"""Plot one or more runs' log.jsonl into one PNG: loss, lr, embedding_std, effective rank, DINO's teacher entropy and
the k-NN top-1, one panel each against the epoch, one line per run (panels no run logged are left out).

    python benchmarks/plot_logs.py runs/simclr/log.jsonl runs/dino/log.jsonl --output curves.png

Needs matplotlib, an optional extra (pip install matplotlib); without it: one error line, exit code 1.
"""
import argparse
import json
import os
import sys

PANELS = {"loss": "loss", "lr": "learning rate", "embedding_std": "embedding_std (collapse: → 0)",
          "effective_rank": "effective rank, RankMe (collapse: → 1)", "teacher_entropy": "teacher entropy (DINO)",
          "knn_top1": "k-NN top-1 (k=20)"}


def read_log(path):
    """The records of one log.jsonl; a resumed run's repeated epochs keep their last record."""
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        sys.exit(f"plot_logs.py: error: cannot read {path}: {error}")
    by_epoch = {}
    for record in records:  # the epoch-0 k-NN line and the epoch-1 line are separate records: merge per epoch
        by_epoch.setdefault(record.get("epoch", 0), {}).update(record)
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def label_of(path):
    """A run's name in the legend: its folder (runs/simclr/log.jsonl -> simclr)."""
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or path


def main(argv=None):
    p = argparse.ArgumentParser("plot_logs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="log.jsonl files written by the method scripts")
    p.add_argument("--output", default="curves.png", help="the PNG to write")
    args = p.parse_args(argv)
    names = [label_of(path) for path in args.logs]
    names = names if len(set(names)) == len(names) else args.logs  # two runs/x/log.jsonl: the full paths
    runs = {name: read_log(path) for name, path in zip(names, args.logs)}
    keys = [key for key in PANELS if any(r.get(key) is not None for records in runs.values() for r in records)]
    if not keys:
        sys.exit(f"plot_logs.py: error: none of {', '.join(PANELS)} in {', '.join(args.logs)}")
    try:  # imported here: the training scripts and the tests never need it
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_logs.py: error: matplotlib is not installed (pip install matplotlib)")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, records in runs.items():
            points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=name)
        ax.set_title(PANELS[key], fontsize=9)
        ax.set_xlabel("epoch")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}: {', '.join(keys)} for {len(runs)} run(s)")


if __name__ == "__main__":
    main()
