"""Figure of the training job: loss and recall accuracy step by step, then held-out recall by rank.

The third panel is the job's point: the answers whose pair sits on another cp rank are recalled as
well as the local ones with context-parallel attention, and near chance by the same weights with
each rank attending to its own shard only.

    python docs/scripts/fig_training.py              # writes docs/assets/figures/training_curve.png
    python docs/scripts/fig_training.py --out /tmp/f # somewhere else (the docs test does this)

The data is ``docs/assets/data/train_curve.json``: the summary that ``python -m cp_dtensor.training
--out FILE`` writes (its ``curve`` holds one entry per step; ``command`` and ``machine`` say what
produced it). Nothing here runs the job; only matplotlib (Agg) and the JSON file are needed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "docs" / "assets" / "data" / "train_curve.json"
SAVE = {"dpi": 120, "bbox_inches": "tight", "metadata": {"Software": None}}
WINDOW = 10  # steps in the running mean of the per-step accuracy (each step scores only a few answers)


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each index (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def fig_training_curve(summary: dict, out: Path) -> None:
    """Loss and recall accuracy per step, then the held-out recall by where the queried pair sits."""
    curve = summary["curve"]
    steps = [c["step"] for c in curve]
    # loss and accuracy above, the held-out split below: at most 7.4 inches wide, shown at full size
    fig = plt.figure(figsize=(7.4, 7.2))
    grid = fig.add_gridspec(2, 2, height_ratios=(1, 1.05))
    ax_loss, ax_acc = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_split = fig.add_subplot(grid[1, :])

    num_values = summary["config"]["num_values"]
    ax_loss.plot(steps, [c["loss"] for c in curve], color="C0", lw=1, label="train loss")
    ax_loss.axhline(math.log(num_values), color="gray", ls="--", lw=1, label=f"ln {num_values}: a uniform guess")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (mean over the global batch)")
    ax_loss.set_ylim(0, None)
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(loc="upper right", fontsize=8)

    accuracy = [c["accuracy"] for c in curve]
    ax_acc.plot(steps, accuracy, color="C0", lw=0.6, alpha=0.35, label="train, per step")
    ax_acc.plot(steps, running_mean(accuracy, WINDOW), color="C0", lw=1.6, label=f"train, mean of {WINDOW} steps")
    ax_acc.axhline(
        summary["chance_accuracy"], color="gray", ls="--", lw=1, label=f"chance ({summary['chance_accuracy']:.1%})"
    )
    ax_acc.plot(
        [steps[-1]],
        [summary["eval_accuracy"]],
        "o",
        color="C3",
        label=f"held-out, end ({summary['eval_accuracy']:.1%})",
    )
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("recall accuracy")
    ax_acc.grid(True, alpha=0.3)
    ax_acc.legend(loc="lower right", fontsize=8)

    _held_out_by_rank(summary, ax_split)

    config = summary["config"]
    fig.suptitle(
        f"{summary['world_size']} ranks = dp {summary['dp']} x cp {summary['cp']} ({summary['device']}, "
        f"{summary['backend']}): {config['seq_len']} tokens/sequence,\n{config['batch_size']} sequences/step",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "training_curve.png", **SAVE)
    plt.close(fig)


def _held_out_by_rank(summary: dict, ax) -> None:
    """Held-out recall of answers whose pair sits on the query's cp rank or another, with and without CP."""
    groups = ("pair on the query's cp rank", "pair on another cp rank")
    bars = {
        "context-parallel attention": (summary["eval_accuracy_local"], summary["eval_accuracy_remote"]),
        "each rank on its own shard": (summary["own_shard_accuracy_local"], summary["own_shard_accuracy_remote"]),
    }
    for i, (label, values) in enumerate(bars.items()):
        xs = [g + (i - 0.5) * 0.38 for g in range(len(groups))]
        ax.bar(xs, values, width=0.36, color=f"C{(0, 3)[i]}", label=label)
        for x, v in zip(xs, values):
            ax.text(x, v + 0.02, f"{v:.0%}", ha="center", fontsize=8)
    ax.axhline(summary["chance_accuracy"], color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(groups)), groups, fontsize=9)
    ax.set_ylim(0, 1.3)  # room above the bars for the legend
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("held-out recall, same weights")
    ax.legend(loc="upper center", fontsize=8, ncol=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "assets" / "figures")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fig_training_curve(json.loads(args.data.read_text()), args.out)


if __name__ == "__main__":
    main()
