"""The ring step by step, forward then backward, drawn from the reference's trace.

    python docs/scripts/fig_ring_steps.py              # writes docs/assets/figures/ring_steps.*
    python docs/scripts/fig_ring_steps.py --out /tmp/f # somewhere else

Writes ``ring_steps.png`` (all frames on one sheet, to step through at your own pace) and
``ring_steps.gif`` (the same frames as an animation). Every frame comes from the trace of
``cp_dtensor.reference.simulate_ring_attention(..., trace=True)`` on 4 virtual ranks, causal, zigzag: which
rank's K/V block each rank holds at each step (``kv_source``), and what kind of block it is
(``kind``). The backward walks the forward's schedule with the dK/dV accumulators riding along
with their K/V block; one extra hop (``cp_dtensor.reference.ring.send_to_next_rank``) takes them home. The
script checks the simulated ring's output and gradients against full attention before drawing.
Only matplotlib (Agg, with its Pillow dependency) and torch are needed.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import cp_dtensor.reference as reference  # noqa: E402
import cp_dtensor.reference.ring  # noqa: E402, F401 (makes reference.ring an attribute)

P, SEQ_LEN = 4, 32
RANK_COLORS = plt.get_cmap("tab10").colors
SAVE = {"dpi": 110, "metadata": {"Software": None}}


def ring_frames() -> list[dict]:
    """One frame per moment of the ring: P forward steps, P backward steps, the send home.

    Each frame: ``phase``, ``step``, ``held`` (rank -> owner of the block it holds), ``kind``
    (rank -> block kind from the trace, or None), ``sends`` (what travels to rank + 1 after it).
    """
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, SEQ_LEN, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    options = {"causal": True, "layout": "zigzag"}
    out, trace = reference.simulate_ring_attention(q, k, v, P, trace=True, **options)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected = reference.full_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, expected)
    for mine, oracle in zip(grads, torch.autograd.grad(expected, (q, k, v), dout)):
        torch.testing.assert_close(mine, oracle)

    entry = {(e.rank, e.step): e for e in trace}
    frames = []
    for phase in ("forward", "backward"):
        for step in range(P):
            held = {r: entry[(r, step)].kv_source for r in range(P)}
            kind = {r: entry[(r, step)].kind for r in range(P)}
            if phase == "forward":
                sends = "K, V" if step < P - 1 else None  # the last block is not passed on
            else:
                sends = "K, V, dK, dV" if step < P - 1 else "dK, dV"  # the P-th send: home
            frames.append({"phase": phase, "step": step, "held": held, "kind": kind, "sends": sends})
    last = [frames[-1]["held"][r] for r in range(P)]
    home = reference.ring.send_to_next_rank(last)
    assert home == list(range(P)), home
    frames.append({"phase": "home", "step": P, "held": dict(enumerate(home)), "kind": None, "sends": None})
    return frames


def _title(frame: dict) -> tuple[str, str]:
    step = frame["step"]
    if frame["phase"] == "forward":
        return f"Forward, step {step}", "attend Q to the block held, merge (out, lse)"
    if frame["phase"] == "backward":
        return f"Backward, step {step}", "add to dQ at home, and to the visiting dK, dV"
    return "Backward, after send P", "every dK, dV is back on its owner"


def _center(rank: int) -> tuple[float, float]:
    angle = math.pi / 2 - 2 * math.pi * rank / P  # rank 0 on top, clockwise
    return 1.38 * math.cos(angle), 1.0 * math.sin(angle)


def draw_frame(ax, frame: dict) -> None:
    """Draw one frame of the ring on ``ax``."""
    ax.set_xlim(-2.05, 2.05)
    ax.set_ylim(-1.75, 2.05)
    ax.set_aspect("equal")
    ax.axis("off")
    title, subtitle = _title(frame)
    ax.text(0, 2.0, title, ha="center", va="top", fontsize=12, fontweight="bold")
    ax.text(0, 1.68, subtitle, ha="center", va="top", fontsize=8.5, color="0.35")
    boxes = []
    for rank in range(P):
        x, y = _center(rank)
        owner = frame["held"][rank]
        box = FancyBboxPatch((x - 0.62, y - 0.36), 1.24, 0.72, boxstyle="round,pad=0.02", fc="white", ec="0.5")
        boxes.append(ax.add_patch(box))
        ax.text(x - 0.56, y + 0.24, f"rank {rank}", fontsize=8, va="center", color="0.3")
        home = f"Q{rank}" if frame["phase"] == "forward" else f"Q{rank} dQ{rank}"
        ax.text(x + 0.56, y + 0.24, home, fontsize=8, va="center", ha="right", color="0.3")
        if frame["phase"] == "forward":
            chip = f"K{owner} V{owner}"
        elif frame["phase"] == "backward":
            chip = f"K{owner} V{owner} dK{owner} dV{owner}"
        else:
            chip = f"dK{owner} dV{owner} home"
        ax.add_patch(
            FancyBboxPatch((x - 0.56, y - 0.08), 1.12, 0.2, boxstyle="round,pad=0.02", fc=RANK_COLORS[owner], ec="none")
        )
        ax.text(x, y + 0.02, chip, ha="center", va="center", fontsize=7.5, color="white", fontweight="bold")
        kind = frame["kind"][rank] if frame["kind"] else "done"
        ax.text(x, y - 0.25, kind, ha="center", va="center", fontsize=8, style="italic")
    if frame["sends"]:
        for rank in range(P):
            arrow = FancyArrowPatch(
                _center(rank),
                _center((rank + 1) % P),
                patchA=boxes[rank],
                patchB=boxes[(rank + 1) % P],
                shrinkA=3,
                shrinkB=3,
                connectionstyle="arc3,rad=-0.3",
                arrowstyle="-|>",
                mutation_scale=12,
                color="0.25",
                lw=1.2,
            )
            ax.add_patch(arrow)
        ax.text(0, -1.62, f"then every rank sends {frame['sends']} to rank + 1", ha="center", fontsize=8.5)
    elif frame["phase"] == "forward":
        ax.text(0, -1.62, "last step: nothing is sent", ha="center", fontsize=8.5)


def fig_ring_steps(out: Path) -> None:
    """Write ring_steps.png (all frames, 3 x 3) and ring_steps.gif (one frame at a time)."""
    frames = ring_frames()
    fig, axes = plt.subplots(3, 3, figsize=(11, 10.2))
    for ax, frame in zip(axes.flat, frames, strict=True):
        draw_frame(ax, frame)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01, wspace=0.04, hspace=0.04)
    fig.savefig(out / "ring_steps.png", **SAVE)
    plt.close(fig)

    images = []
    for frame in frames:
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        draw_frame(ax, frame)
        fig.subplots_adjust(left=0, right=1, top=1, bottom=0)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        images.append(Image.open(buffer).convert("RGB").quantize(colors=64))
    durations = [1600] * len(images)
    durations[P - 1] = durations[-1] = 2600  # linger at the end of each pass
    images[0].save(out / "ring_steps.gif", save_all=True, append_images=images[1:], duration=durations, loop=0)


def main() -> None:
    """Command line: draw the figures into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "assets" / "figures")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    fig_ring_steps(out)
    print("wrote ring_steps.png, ring_steps.gif")


if __name__ == "__main__":
    main()
