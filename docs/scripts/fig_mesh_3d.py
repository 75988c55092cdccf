"""Figure of the seed's 3-D example: 64 GPUs as dp 2 x cp 8 x tp 4 on the ("dp", "cp", "tp") mesh.

    python docs/scripts/fig_mesh_3d.py              # writes docs/assets/figures/mesh_3d.png
    python docs/scripts/fig_mesh_3d.py --out /tmp/f # somewhere else

The rank of every (dp, cp, tp) cell comes from :func:`rank_grid`, the row-major rule by which
``init_device_mesh`` lays out the mesh that ``init_context_parallel_group(8, tp_size=4)`` asks for;
tests/test_tensor_parallel.py checks :func:`rank_grid` against the real mesh on 8 gloo ranks. Only
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
DP, CP, TP, GPUS_PER_NODE = 2, 8, 4, 8
TP_COLORS = plt.get_cmap("Set2").colors
SAVE = {"dpi": 120, "bbox_inches": "tight", "metadata": {"Software": None}}


def rank_grid(dp: int, cp: int, tp: int) -> torch.Tensor:
    """Global rank at ``[dp_rank, cp_rank, tp_rank]``: row-major, so tp varies fastest.

    Returns:
        ``(dp, cp, tp)`` long tensor.
    """
    return torch.arange(dp * cp * tp).reshape(dp, cp, tp)


def fig_mesh_3d(out: Path) -> None:
    """Two panels (dp replicas); rows are cp ranks, columns tp ranks; a cell is one GPU's global rank."""
    grid = rank_grid(DP, CP, TP)
    fig, axes = plt.subplots(1, DP, figsize=(9.5, 6.2))
    for dp_rank, ax in enumerate(axes):
        for cp_rank in range(CP):
            for tp_rank in range(TP):
                rank = int(grid[dp_rank, cp_rank, tp_rank])
                y = CP - 1 - cp_rank
                ax.add_patch(plt.Rectangle((tp_rank + 0.06, y + 0.1), 0.88, 0.8, color=TP_COLORS[tp_rank]))
                ax.text(tp_rank + 0.5, y + 0.5, str(rank), ha="center", va="center", fontsize=10)
            # One row = one tp group: 4 consecutive ranks, inside one node.
            ax.add_patch(
                FancyBboxPatch(
                    (0.02, y + 0.05),
                    TP - 0.04,
                    0.9,
                    boxstyle="round,pad=0,rounding_size=0.15",
                    fill=False,
                    lw=1.2,
                    ec="#333333",
                )
            )
        for boundary in range(GPUS_PER_NODE // TP, CP, GPUS_PER_NODE // TP):  # node boundaries
            ax.axhline(CP - boundary, color="gray", ls="--", lw=0.8)
        nodes = [int(grid[dp_rank].min()) // GPUS_PER_NODE, int(grid[dp_rank].max()) // GPUS_PER_NODE]
        ax.set_title(f"dp rank {dp_rank}: one replica, nodes {nodes[0]}-{nodes[1]}", fontsize=11)
        ax.set_xlim(0, TP)
        ax.set_ylim(0, CP)
        ax.set_xticks([t + 0.5 for t in range(TP)], [f"tp {t}" for t in range(TP)])
        ax.set_yticks([CP - 1 - c + 0.5 for c in range(CP)], [f"cp {c}" for c in range(CP)])
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(
        f'{DP * CP * TP} GPUs: {CP}-way CP x {TP}-way TP x {DP}-way DP, mesh ("dp", "cp", "tp") = ({DP}, {CP}, {TP})',
        fontsize=12,
    )
    fig.text(
        0.5,
        0.005,
        "row: a tp group (4 consecutive ranks in one node) splits the heads and MLP width\n"
        "column: a cp ring (8 ranks, stride 4) shares one sequence; the same cell in both panels: dp replicas\n"
        "one colour: the 16 ranks that hold the same weight shard; gradients are summed over them (dp x cp)\n"
        "dashed line: node boundary (8 GPUs per node)",
        ha="center",
        va="bottom",
        fontsize=9.5,
    )
    fig.subplots_adjust(bottom=0.2, top=0.9, wspace=0.35)
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
