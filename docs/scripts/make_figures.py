"""Regenerate the figures of the tutorial site from the project's own code.

    python docs/scripts/make_figures.py              # writes docs/assets/figures/*.png
    python docs/scripts/make_figures.py --out /tmp/f # somewhere else (the docs test does this)

Each ``fig_*`` function draws one figure, named after the page that shows it. Formulas are the
ones on the pages; the ring figures come from ``cp_dtensor.reference.simulate_ring_attention(..., trace=True)``.
Only matplotlib (Agg) and torch are needed; nothing is drawn by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import cp_dtensor.reference as reference  # noqa: E402
import cp_dtensor.reference.ring  # noqa: E402, F401 (makes reference.ring an attribute)

GiB = 2**30
RANK_COLORS = plt.get_cmap("tab10").colors
SAVE = {"dpi": 120, "bbox_inches": "tight", "metadata": {"Software": None}}


def fig_why_cp_memory(out: Path) -> None:
    """Page 1: activation memory of one layer vs sequence length (why-cp.md formulas)."""
    d_model, num_heads, P = 4096, 32, 8
    lengths = torch.logspace(12, 20, 200, base=2)  # 4K .. 1M tokens
    linear = 34 * d_model * lengths  # Korthikanti et al. 2022, fused attention
    naive = linear + 5 * num_heads * lengths**2  # with the materialised score terms
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.loglog(lengths, naive / GiB, label="scores materialised (naive attention)", color="C3")
    ax.loglog(lengths, linear / GiB, label="fused attention", color="C0")
    ax.loglog(lengths, linear / P / GiB, label=f"fused attention, context parallel P = {P}", color="C2")
    ax.axhline(80e9 / GiB, color="gray", ls="--", lw=1)
    ax.text(lengths[0], 80e9 / GiB * 1.15, "80 GB (one H100)", color="gray", fontsize=9)
    ticks = [2**k for k in range(12, 21, 2)]
    ax.set_xticks(ticks, [f"{t // 1024}K" for t in ticks])
    ax.set_xlabel("sequence length L (tokens)")
    ax.set_ylabel("activations of one layer (GiB)")
    ax.set_title("One Llama-3-8B-shaped layer, bf16, batch 1")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.savefig(out / "why_cp_memory.png", **SAVE)
    plt.close(fig)


def fig_blocks_merge(out: Path) -> None:
    """Page 2: one query row's softmax, per block, and merged with the sigmoid weights."""
    torch.manual_seed(3)
    n, d = 16, 8
    q, k = torch.randn(d), torch.randn(n, d)
    s = k @ q / d**0.5  # (n,) scores of one query row
    a, b = slice(0, n // 2), slice(n // 2, n)
    p_full = torch.softmax(s, 0)
    p_a, p_b = torch.softmax(s[a], 0), torch.softmax(s[b], 0)
    lse_a, lse_b = torch.logsumexp(s[a], 0), torch.logsumexp(s[b], 0)
    w_b = torch.sigmoid(lse_b - lse_a)
    merged = torch.cat([(1 - w_b) * p_a, w_b * p_b])
    assert torch.allclose(merged, p_full, atol=1e-6)
    x = torch.arange(n)
    colors = ["C0"] * (n // 2) + ["C1"] * (n // 2)
    # two panels above, the merge below: at most 7.4 inches wide, so that the column shows it at full size
    fig = plt.figure(figsize=(7.2, 5.8))
    grid = fig.add_gridspec(2, 2)
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])]
    top = 1.5 * max(p_a.max(), p_b.max()).item()  # headroom: the legends sit above the bars
    axes[0].bar(x, p_full, color=colors)
    axes[0].set_title("softmax over all 16 keys")
    axes[1].bar(x[a], p_a, color="C0", label="block A (sums to 1)")
    axes[1].bar(x[b], p_b, color="C1", label="block B (sums to 1)")
    axes[1].set_title("each block on its own")
    axes[1].legend(fontsize=8, loc="upper center", ncol=1)
    axes[2].bar(x, merged, color=colors)
    axes[2].plot(x, p_full, "k.", ms=9, label="full softmax")
    axes[2].set_title(rf"merged: A $\times$ {1 - w_b:.2f}, B $\times$ {w_b:.2f}  ($\sigma(\ell_B-\ell_A)$)")
    axes[2].legend(fontsize=8, loc="upper right")
    for ax in axes:
        ax.set_xlabel("key index")
        ax.set_xticks(range(0, n, 2))
    for ax in axes[:2]:
        ax.set_ylim(0, top)
    axes[2].set_ylim(0, 1.35 * p_full.max().item())
    axes[0].set_ylabel("attention weight")
    axes[2].set_ylabel("attention weight")
    fig.tight_layout()
    fig.savefig(out / "blocks_merge.png", **SAVE)
    plt.close(fig)


def _trace(world_size: int, *, causal: bool, layout: str, seq_len: int = 32):
    """Run the reference ring on small random inputs and return its trace."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, seq_len, 4, dtype=torch.float64) for _ in range(3))
    out, trace = reference.simulate_ring_attention(q, k, v, world_size, causal=causal, layout=layout, trace=True)
    torch.testing.assert_close(out, reference.full_attention(q, k, v, causal=causal))
    return trace


def fig_ring_schedule(out: Path) -> None:
    """Page 3: which rank's K/V block each rank holds at each step (non-causal trace, P = 4)."""
    P = 4
    trace = _trace(P, causal=False, layout="contiguous")
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    for e in trace:
        ax.add_patch(plt.Rectangle((e.step, e.rank), 0.94, 0.9, color=RANK_COLORS[e.kv_source], alpha=0.85))
        ax.text(
            e.step + 0.47,
            e.rank + 0.45,
            f"K{e.kv_source} V{e.kv_source}",
            ha="center",
            va="center",
            color="white",
            fontsize=10,
            fontweight="bold",
        )
    for step in range(P - 1):
        ax.annotate(
            "",
            xy=(step + 1.0, P + 0.25),
            xytext=(step + 0.9, P + 0.25),
            arrowprops={"arrowstyle": "->", "color": "gray"},
        )
        ax.text(step + 0.95, P + 0.45, "send", ha="center", color="gray", fontsize=8)
    ax.set_xlim(-0.05, P)
    ax.set_ylim(P + 0.7, -0.1)
    ax.set_xticks([s + 0.47 for s in range(P)], [f"step {s}" for s in range(P)])
    ax.set_yticks([r + 0.45 for r in range(P)], [f"rank {r} (Q{r})" for r in range(P)])
    ax.set_title("Block held at each step: rank r holds K/V of rank (r - step) mod P", fontsize=10)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    fig.savefig(out / "ring_schedule.png", **SAVE)
    plt.close(fig)


def fig_backward_ring(out: Path) -> None:
    """Page 5: where each block's dK/dV accumulators are at each backward step, and the send home."""
    P = 4
    trace = _trace(P, causal=False, layout="contiguous")
    held = {(e.rank, e.step): e.kv_source for e in trace}  # the backward walks the forward's schedule
    last = [held[(r, P - 1)] for r in range(P)]
    home = reference.ring.send_to_next_rank(last)  # the P-th send: accumulators only
    assert home == list(range(P))
    fig, ax = plt.subplots(figsize=(7.4, 3.6))
    columns = [[held[(r, step)] for r in range(P)] for step in range(P)] + [home]
    for col, owners in enumerate(columns):
        for rank, owner in enumerate(owners):
            alpha = 0.85 if col < P else 0.6
            ax.add_patch(plt.Rectangle((col, rank), 0.94, 0.9, color=RANK_COLORS[owner], alpha=alpha))
            label = f"dK{owner} dV{owner}" if col < P else f"dK{owner} dV{owner}\nat home"
            ax.text(
                col + 0.47, rank + 0.45, label, ha="center", va="center", color="white", fontsize=9, fontweight="bold"
            )
    ax.set_xlim(-0.05, P + 1)
    ax.set_ylim(P, -0.1)
    ax.set_xticks([c + 0.47 for c in range(P + 1)], [f"step {s}" for s in range(P)] + ["after send P"])
    ax.set_yticks([r + 0.45 for r in range(P)], [f"rank {r}" for r in range(P)])
    ax.set_title("Backward: the dK/dV accumulators travel with their K/V block", fontsize=10)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    fig.savefig(out / "backward_ring.png", **SAVE)
    plt.close(fig)


def _who_computes(trace, seq_len: int, world_size: int, layout: str) -> torch.Tensor:
    """(S, S) map of the global score matrix: the rank that computes each pair, -1 where none."""
    positions = reference.shard_indices(seq_len, world_size, layout)
    owner = torch.full((seq_len, seq_len), -1)
    for e in trace:
        rows, cols = positions[e.rank], positions[e.kv_source]
        block = owner[rows][:, cols]
        block[e.visible] = e.rank
        owner[rows.unsqueeze(1), cols.unsqueeze(0)] = block
    return owner


def fig_causal_load_balance(out: Path) -> None:
    """Page 4: causal work per rank, contiguous vs zigzag, from the reference trace (P = 4)."""
    P, S = 4, 32
    cmap = matplotlib.colors.ListedColormap(["white", *RANK_COLORS[:P]])
    fig, axes = plt.subplots(2, 2, figsize=(7.2, 6.6), gridspec_kw={"width_ratios": [1.1, 1]})
    for row, layout in enumerate(("contiguous", "zigzag")):
        trace = _trace(P, causal=True, layout=layout, seq_len=S)
        owner = _who_computes(trace, S, P, layout)
        axes[row, 0].imshow(owner + 1, cmap=cmap, vmin=0, vmax=P, interpolation="nearest")
        axes[row, 0].set_title(f"{layout}: who computes each pair", fontsize=10)
        axes[row, 0].set_xlabel("key position")
        axes[row, 0].set_ylabel("query position")
        work = reference.trace_work_per_rank(trace, P)
        mean = sum(work) / P
        axes[row, 1].bar(range(P), [w / mean for w in work], color=RANK_COLORS[:P])
        axes[row, 1].axhline(1.0, color="gray", ls="--", lw=1)
        axes[row, 1].set_ylim(0, 2)
        axes[row, 1].set_xticks(range(P), [f"rank {r}" for r in range(P)])
        axes[row, 1].set_ylabel("work / mean work")
        axes[row, 1].set_title(f"{layout}: max / mean = {max(work) / mean:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "causal_load_balance.png", **SAVE)
    plt.close(fig)


def fig_home_overview(out: Path) -> None:
    """Home: context parallelism in one picture, from the reference ring's trace (P = 4, zigzag, causal)."""
    P, S = 4, 16
    positions = reference.shard_indices(S, P, "zigzag")
    owner_of_token = torch.empty(S, dtype=torch.long)
    for rank, idx in enumerate(positions):
        owner_of_token[idx] = rank
    trace = _trace(P, causal=True, layout="zigzag", seq_len=S)
    owner = _who_computes(trace, S, P, "zigzag")
    assert (owner >= 0).sum() == S * (S + 1) // 2  # every visible pair computed, once
    fig = plt.figure(figsize=(7.4, 2.9))
    grid = fig.add_gridspec(1, 3, width_ratios=(1.3, 1, 1), wspace=0.4, top=0.85)
    seq, ring, pairs = (fig.add_subplot(grid[0, i]) for i in range(3))
    # 1. the sequence, cut into shards
    for t in range(S):
        rank = int(owner_of_token[t])
        seq.add_patch(plt.Rectangle((t, 0), 0.9, 2.4, color=RANK_COLORS[rank]))
        seq.text(t + 0.45, 1.2, str(rank), ha="center", va="center", fontsize=8, color="white", fontweight="bold")
    seq.set_xlim(-0.2, S)
    seq.set_ylim(-1.6, 4.0)
    seq.axis("off")
    seq.text(S / 2, 3.0, f"{S} tokens; the rank that holds each", ha="center", fontsize=8)
    seq.text(S / 2, -0.9, "every layer holds L / P tokens", ha="center", fontsize=8)
    # 2. the ring that brings every rank the other shards' keys and values
    angles = [90 - 360 * r / P for r in range(P)]
    xy = [(torch.tensor(a).deg2rad().cos().item(), torch.tensor(a).deg2rad().sin().item()) for a in angles]
    for r, (x, y) in enumerate(xy):
        ring.add_patch(plt.Circle((x, y), 0.34, color=RANK_COLORS[r]))
        ring.text(x, y, f"{r}", ha="center", va="center", fontsize=10, color="white", fontweight="bold")
        nx, ny = xy[(r + 1) % P]
        ring.annotate(
            "",
            xy=(x + 0.62 * (nx - x), y + 0.62 * (ny - y)),
            xytext=(x + 0.38 * (nx - x), y + 0.38 * (ny - y)),
            arrowprops={"arrowstyle": "->", "color": "gray", "lw": 1.5},
        )
    ring.text(0, 0, "K/V\nblocks", ha="center", va="center", fontsize=8, color="gray")
    ring.set_xlim(-1.45, 1.45)
    ring.set_ylim(-1.45, 1.45)
    ring.set_aspect("equal")
    ring.axis("off")
    # 3. who computes which (query, key) pair: every pair once, the work shared evenly
    cmap = matplotlib.colors.ListedColormap(["white", *RANK_COLORS[:P]])
    pairs.imshow(owner + 1, cmap=cmap, vmin=0, vmax=P, interpolation="nearest")
    pairs.set_xticks([])
    pairs.set_yticks([])
    pairs.set_xlabel("key", fontsize=8)
    pairs.set_ylabel("query", fontsize=8)
    titles = ("1. split the sequence", "2. pass K/V around a ring", "3. who computes each pair")
    for ax, title in zip((seq, ring, pairs), titles):  # one baseline for the three titles
        box = ax.get_position()
        fig.text((box.x0 + box.x1) / 2, 0.93, title, ha="center", fontsize=10)
    fig.savefig(out / "home_overview.png", **SAVE)
    plt.close(fig)


def fig_why_cp_split(out: Path) -> None:
    """Page 1: what each device holds of one sequence's activations under DP, TP, PP and CP (P = 4).

    A grid of layers (rows) by tokens (columns); a cell's colour is the device that holds it. TP splits
    every cell (the hidden width) into P slices; CP's columns follow the zigzag layout of
    ``reference.shard_indices``.
    """
    P, layers, S = 4, 4, 16
    zigzag = reference.shard_indices(S, P, "zigzag")
    cp_owner = {int(t): r for r, idx in enumerate(zigzag) for t in idx}
    panels = {
        "data parallel: a whole sequence per device": lambda layer, t: [0],
        "tensor parallel: a slice of every activation": lambda layer, t: list(range(P)),
        "pipeline parallel: a quarter of the layers": lambda layer, t: [layer * P // layers],
        "context parallel: a quarter of the tokens": lambda layer, t: [cp_owner[t]],
    }
    fig, axes = plt.subplots(2, 2, figsize=(7.4, 4.6))
    for ax, (title, holders) in zip(axes.flat, panels.items()):
        for layer in range(layers):
            for t in range(S):
                devices = holders(layer, t)
                height = 0.86 / len(devices)
                for i, d in enumerate(devices):
                    ax.add_patch(
                        plt.Rectangle((t + 0.05, layer + 0.07 + i * height), 0.9, height, color=RANK_COLORS[d])
                    )
        ax.set_xlim(0, S)
        ax.set_ylim(layers, 0)
        ax.set_xticks([0.5, S - 0.5], ["token 0", f"token {S - 1}"], fontsize=8)
        ax.set_yticks([r + 0.5 for r in range(layers)], [f"layer {r}" for r in range(layers)], fontsize=8)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_title(title, fontsize=9)
    axes[0, 0].text(S / 2, layers + 0.75, "(devices 1-3 need other sequences)", ha="center", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=RANK_COLORS[d]) for d in range(P)]
    fig.legend(handles, [f"device {d}" for d in range(P)], loc="lower center", ncol=P, fontsize=8, frameon=False)
    fig.suptitle("Who holds the activations of one sequence, 4 devices", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out / "why_cp_split.png", **SAVE)
    plt.close(fig)


def fig_overlap_timeline(out: Path) -> None:
    """Page 6: one rank's ring steps on two clocks, compute and send, from page 6's formulas.

    The compute of each forward step is proportional to the (query, key) pairs the reference ring's
    trace gives rank 0 under the causal zigzag layout (P = 4); the send is one K/V block. Hardware:
    H100 over NVLink (989 TFLOP/s dense bf16, 450 GB/s per direction), 32 query and 8 K/V heads of
    128, bf16. Two block sizes: below and above the threshold of page 6.
    """
    P, H, H_KV, D, F, B = 4, 32, 8, 128, 989e12, 450e9
    trace = _trace(P, causal=True, layout="zigzag", seq_len=8 * P)
    pairs = [e.pairs for e in sorted(trace, key=lambda e: e.step) if e.rank == 0]
    share = [n / (pairs[0] * 2) for n in pairs]  # of a full c x c block (step 0 is the causal half)
    fig, axes = plt.subplots(2, 1, figsize=(7.4, 4.4))
    for ax, c in zip(axes, (512, 8192)):
        compute = [4 * c * c * H * D * f / F * 1e6 for f in share]  # microseconds
        send = 2 * c * H_KV * D * 2 / B * 1e6
        rows = {"compute": 1.6, "send / receive": 0.6}
        t = 0.0
        for step, cost in enumerate(compute):
            last = step == P - 1
            ax.add_patch(plt.Rectangle((t, rows["compute"]), cost, 0.7, fc="C0", ec="white", lw=1.5))
            ax.text(
                t + cost / 2,
                rows["compute"] + 0.35,
                f"step {step}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if cost > 0.08 * sum(compute) else "black",
            )
            if not last:  # the last block is not passed on
                ax.add_patch(plt.Rectangle((t, rows["send / receive"]), send, 0.7, fc="C1", ec="white", lw=1.5))
                wide = send > 0.08 * sum(compute)  # a narrow bar gets its label beside it
                ax.text(
                    t + (send / 2 if wide else send * 1.15),
                    rows["send / receive"] + 0.35,
                    f"K/V for step {step + 1}",
                    ha="center" if wide else "left",
                    va="center",
                    fontsize=7,
                    color="white" if wide else "black",
                )
            t += cost if last else max(cost, send)  # the next step needs the next block
        ax.set_yticks([r + 0.35 for r in rows.values()], list(rows))
        ax.set_ylim(0.3, 2.6)
        ax.set_xlim(0, t * 1.02)
        ax.set_xlabel("time (µs)", fontsize=8)
        hidden = all(cost >= send for cost in compute[:-1])
        verdict = "sends hidden behind compute" if hidden else "compute waits for the sends"
        ax.set_title(f"c = {c:,} tokens per rank: {verdict} ({t:,.0f} µs)", fontsize=9)
        ax.tick_params(labelsize=8)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    fig.suptitle("Rank 0's causal forward on 4 ranks: each step posts its send, then computes", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "overlap_timeline.png", **SAVE)
    plt.close(fig)


FIGURES = [
    fig_home_overview,
    fig_why_cp_memory,
    fig_why_cp_split,
    fig_blocks_merge,
    fig_ring_schedule,
    fig_backward_ring,
    fig_causal_load_balance,
    fig_overlap_timeline,
]


def main(figures: list | None = None, description: str = __doc__) -> None:
    """Command line of a figure script: draw ``figures`` (default: this file's) into ``--out``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "assets" / "figures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for fig in FIGURES if figures is None else figures:
        fig(args.out)
        print(f"wrote {fig.__name__.removeprefix('fig_')}.png")


if __name__ == "__main__":
    main()
