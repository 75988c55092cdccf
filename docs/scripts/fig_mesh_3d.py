"""Figure of a 64-GPU 3-D layout: dp 8 x cp 4 x tp 2 on the ("dp", "cp", "tp") mesh.

    python docs/scripts/fig_mesh_3d.py              # writes docs/assets/figures/mesh_3d.png
    python docs/scripts/fig_mesh_3d.py --out /tmp/f # somewhere else

The rank of every (dp, cp, tp) cell comes from :func:`rank_grid`, the row-major rule by which
``init_device_mesh`` lays out the mesh that ``init_context_parallel_group(4, tp_size=2)``
asks for on 64 ranks; tests/test_tensor_parallel.py checks :func:`rank_grid` against the real
mesh on 8 gloo ranks. With 8 GPUs per node and cp x tp = 8, every tp group AND every cp ring
sits inside one node, as the docs advise; only the dp gradient sum crosses nodes. Only
matplotlib (Agg) and torch are needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DP, CP, TP, GPUS_PER_NODE = 8, 4, 2, 8
TP_COLORS = plt.get_cmap("Set2").colors
SAVE = {"dpi": 120, "bbox_inches": "tight", "metadata": {"Software": None}}


def rank_grid(dp: int, cp: int, tp: int) -> torch.Tensor:
    """Global rank at ``[dp_rank, cp_rank, tp_rank]``: row-major, so tp varies fastest.

    Returns:
        ``(dp, cp, tp)`` long tensor.
    """
    return torch.arange(dp * cp * tp).reshape(dp, cp, tp)


def draw_node(ax: plt.Axes, grid: torch.Tensor, dp_rank: int) -> None:
    """One dp replica: rows are cp ranks, columns tp ranks; a cell is one GPU's global rank."""
    for cp_rank in range(CP):
        y = CP - 1 - cp_rank
        for tp_rank in range(TP):
            rank = int(grid[dp_rank, cp_rank, tp_rank])
            cell = plt.Rectangle((tp_rank + 0.06, y + 0.1), 0.88, 0.8, color=TP_COLORS[tp_rank])
            ax.add_patch(cell)
            ax.text(tp_rank + 0.5, y + 0.5, str(rank), ha="center", va="center", fontsize=9)
    for tp_rank in range(TP):  # one column = one cp ring (stride TP), inside this node
        ring = FancyBboxPatch(
            (tp_rank + 0.02, 0.04),
            0.96,
            CP - 0.08,
            boxstyle="round,pad=0,rounding_size=0.12",
            fill=False,
            lw=1.2,
            ec="#333333",
        )
        ax.add_patch(ring)
    nodes = {int(r) // GPUS_PER_NODE for r in grid[dp_rank].flatten()}
    assert len(nodes) == 1, "every replica, so every cp ring and tp group, is in one node"
    ax.set_title(f"node {nodes.pop()} = dp rank {dp_rank}", fontsize=10)
    ax.set_xlim(0, TP)
    ax.set_ylim(0, CP)
    ax.set_xticks([t + 0.5 for t in range(TP)], [f"tp {t}" for t in range(TP)], fontsize=9)
    ax.set_yticks([CP - 1 - c + 0.5 for c in range(CP)], [f"cp {c}" for c in range(CP)], fontsize=9)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def fig_mesh_3d(out: Path) -> None:
    """Eight panels, one per node (= one dp replica): its cp rings and tp groups."""
    grid = rank_grid(DP, CP, TP)
    # at most 7.4 inches wide: the page's column shows it at full size
    fig, axes = plt.subplots(2, DP // 2, figsize=(7.4, 6.4))
    for dp_rank, ax in enumerate(axes.flat):
        draw_node(ax, grid, dp_rank)
    fig.suptitle(
        f"{DP * CP * TP} GPUs on {DP * CP * TP // GPUS_PER_NODE} nodes: {CP}-way CP x "
        f'{TP}-way TP x {DP}-way DP,\nmesh ("dp", "cp", "tp") = ({DP}, {CP}, {TP})',
        fontsize=11,
    )
    fig.text(
        0.5,
        0.005,
        "row: a tp group (2 consecutive ranks) splits the heads and MLP width\n"
        "boxed column: a cp ring (4 ranks, stride 2) shares one sequence;\nboth stay in the node\n"
        "one colour: the 32 ranks (dp x cp) that hold the same weight shard\nand sum its gradient",
        ha="center",
        va="bottom",
        fontsize=9.5,
    )
    fig.subplots_adjust(bottom=0.22, top=0.86, wspace=0.5, hspace=0.4)
    fig.savefig(out / "mesh_3d.png", **SAVE)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "assets" / "figures")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    fig_mesh_3d(out)


if __name__ == "__main__":
    main()
