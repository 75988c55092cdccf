"""Figures of page 12 (packed documents and windows), drawn from the reference ring's trace.

    python docs/scripts/fig_masks.py              # writes docs/assets/figures/masks_*.png
    python docs/scripts/fig_masks.py --out /tmp/f # somewhere else

Three cases on P = 4 virtual ranks, 64 tokens: packed documents with the zigzag layout, and a causal
window of 4 tokens with the contiguous and with the zigzag layout. ``masks_pairs.png`` colours each
visible (query, key) pair by the rank that computes it; ``masks_blocks.png`` shows, for every
(rank, step), whether the held block is skipped, partly visible or fully visible, and the step after
which the ring may stop (`cp_dtensor.reference.ring_steps_needed`). Only matplotlib (Agg) and torch are needed.
"""

from __future__ import annotations

from pathlib import Path

import make_figures  # this directory; imported first, it selects Agg and puts the repo on sys.path
import matplotlib
import matplotlib.pyplot as plt
import torch
from make_figures import SAVE

import cp_dtensor.reference as reference

P, S = 4, 64
DOC_LENGTHS = [5, 22, 3, 9, 17, 8]  # shorter than a zigzag chunk (8), and longer than a shard (16)
WINDOW = (3, 0)  # causal window of 4 tokens: the query and the 3 before it
RANK_COLORS = plt.get_cmap("tab10").colors
KIND_COLORS = {"skipped": "#f2f2f2", "partial": "#9ecae1", "full": "#2171b5"}


def cases() -> dict[str, tuple[str, dict]]:
    """Title -> (layout, mask arguments of `cp_dtensor.reference.simulate_ring_attention`)."""
    ids = reference.document_ids_from_lengths(DOC_LENGTHS, S)[None]  # (1, S)
    return {
        "packed documents, zigzag": ("zigzag", {"causal": True, "document_ids": ids}),
        "window of 4, contiguous": ("contiguous", {"causal": True, "window": WINDOW}),
        "window of 4, zigzag": ("zigzag", {"causal": True, "window": WINDOW}),
    }


def run(layout: str, mask: dict):
    """The masked ring on small random inputs, checked against the oracle; its trace."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, S, 4, dtype=torch.float64) for _ in range(3))
    out, trace = reference.simulate_ring_attention(q, k, v, P, layout=layout, trace=True, **mask)
    dense = reference.make_mask(1, S, **mask).dense(S)
    torch.testing.assert_close(out, reference.full_attention(q, k, v, mask=dense))
    return trace


def block_kind(entry) -> str:
    """skipped / partial / full: how much of the held block the mask leaves."""
    if entry.pairs == 0:
        return "skipped"
    return "full" if entry.pairs == entry.visible.numel() else "partial"


def who_computes(trace, layout: str) -> torch.Tensor:
    """(S, S): the rank that computes each global (query, key) pair, -1 where nobody does."""
    positions = reference.shard_indices(S, P, layout)
    owner = torch.full((S, S), -1)
    for e in trace:
        visible = e.visible.reshape(e.visible.shape[-2:])  # batch of one
        rows, cols = positions[e.rank][:, None], positions[e.kv_source][None, :]
        owner[rows, cols] = torch.where(visible, e.rank, owner[rows, cols])
    return owner


def fig_masks_pairs(out: Path) -> None:
    cmap = matplotlib.colors.ListedColormap(["white", *RANK_COLORS[:P]])
    # 2 x 2, the legend in the fourth cell: at most 7.4 inches wide, shown at full size in the column
    fig, grid = plt.subplots(2, 2, figsize=(7.2, 7.4))
    axes = grid.flat
    for ax, (title, (layout, mask)) in zip(axes, cases().items()):
        owner = who_computes(run(layout, mask), layout)
        ax.imshow(owner + 1, cmap=cmap, vmin=0, vmax=P, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    handles = [plt.Rectangle((0, 0), 1, 1, color=RANK_COLORS[r]) for r in range(P)]
    grid[1, 1].axis("off")
    grid[1, 1].legend(handles, [f"rank {r}" for r in range(P)], loc="center", fontsize=10, frameon=False)
    fig.suptitle("Who computes each visible (query, key) pair\n(white: hidden by the mask)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "masks_pairs.png", **SAVE)
    plt.close(fig)


def fig_masks_blocks(out: Path) -> None:
    # one case per row: at most 7.4 inches wide, shown at full size in the column
    fig, axes = plt.subplots(3, 1, figsize=(6.4, 8.4))
    kinds_seen = set()
    for ax, (title, (layout, mask)) in zip(axes, cases().items()):
        trace = run(layout, mask)
        kinds_seen |= {block_kind(e) for e in trace}
        for e in trace:
            ax.add_patch(plt.Rectangle((e.step, e.rank), 0.94, 0.9, color=KIND_COLORS[block_kind(e)]))
            share = f"{e.pairs / e.visible.numel():.0%}"
            ax.text(e.step + 0.47, e.rank + 0.45, f"K{e.kv_source}\n{share}", ha="center", va="center", fontsize=8)
        stop = reference.ring_steps_needed(trace)
        if stop < P:
            ax.axvline(stop - 0.03, color="C3", lw=2)
            ax.text(stop + 0.02, P + 0.35, "ring may stop", color="C3", fontsize=8, va="center")
        ax.set_xlim(-0.05, P)
        ax.set_ylim(P + 0.6, -0.1)
        ax.set_xticks([s + 0.47 for s in range(P)], [f"step {s}" for s in range(P)])
        ax.set_yticks([r + 0.45 for r in range(P)], [f"rank {r}" for r in range(P)])
        ax.set_title(f"{title} (steps needed: {stop})", fontsize=10)
        ax.tick_params(length=0)
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
    labels = {
        "skipped": "skipped: the mask hides the whole block",
        "partial": "partly visible",
        "full": "fully visible",
    }
    shown = [kind for kind in KIND_COLORS if kind in kinds_seen]
    handles = [plt.Rectangle((0, 0), 1, 1, color=KIND_COLORS[kind]) for kind in shown]
    fig.legend(handles, [labels[kind] for kind in shown], loc="lower center", ncol=len(shown), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out / "masks_blocks.png", **SAVE)
    plt.close(fig)


FIGURES = [fig_masks_pairs, fig_masks_blocks]


if __name__ == "__main__":
    make_figures.main(FIGURES, __doc__)
