"""The ``cp-dtensor`` command line.

Subcommands (each registers itself in :func:`build_parser` through one ``_add_<name>`` function)::

    cp-dtensor estimate --seq-len 1M --hidden-size 4096 --num-layers 32 --cp-size 8
    cp-dtensor estimate --seq-len 128K --hidden-size 4096 --num-layers 32 --cp-size 4 --json
    cp-dtensor plan --config config.json --seq-len 128K --world-size 8 --device H100

``estimate`` prints :func:`cp_dtensor.estimate.memory.estimate_context_parallel_memory_savings` as a table of
per-rank peak memory by component, without and with context parallelism (``--json``: the dict).
``plan`` prints :func:`cp_dtensor.estimate.planner.plan`: the best dp x cp x tp, strategy and memory
options for a model, a sequence length and a cluster, the runners-up and the rejections.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cp_dtensor.estimate.memory import (
    ACTIVATION_CHECKPOINTING,
    ATTENTIONS,
    DTYPE_BYTES,
    OPTIMIZER_STATES,
    PARAM_SHARDINGS,
    ModelDims,
    _resolve_dims,
    estimate_context_parallel_memory_savings,
)
from cp_dtensor.estimate.planner import DEVICES, dims_from_config, format_plan, plan

__all__ = ["main", "build_parser", "parse_tokens"]

_SUFFIXES = {"k": 1024, "m": 1024**2, "g": 1024**3}


def parse_tokens(text: str) -> int:
    """A token count: ``4096``, ``1_000_000``, or with a binary suffix ``4K`` (4096), ``1M`` (1048576).

    Raises:
        argparse.ArgumentTypeError: ``text`` is not such a count.
    """
    clean = text.strip().replace("_", "").replace(",", "")
    scale = _SUFFIXES.get(clean[-1:].lower(), 1)
    digits = clean[:-1] if scale > 1 else clean
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"invalid token count {text!r}; use e.g. 4096, 1_000_000, 128K or 1M")
    return int(digits) * scale


def _add_estimate(subparsers) -> None:
    p = subparsers.add_parser(
        "estimate",
        help="per-rank peak memory without and with context parallelism",
        description="Estimate one rank's peak training memory of the Llama-style decoder without CP (P = 1) "
        "and with CP (P = --cp-size), by component, and the longest sequence that fits the budget. "
        "Sizes in GiB. Formulas: the docstring of cp_dtensor.estimate.memory.",
    )
    p.add_argument("--seq-len", type=parse_tokens, required=True, help="global sequence length L (4K = 4096)")
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--cp-size", type=int, required=True, help="ranks sharing one sequence (P)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per dp replica (default 1)")
    p.add_argument("--num-heads", type=int, default=None, help="default hidden_size // 128")
    p.add_argument("--num-kv-heads", type=int, default=None, help="GQA; default num_heads")
    p.add_argument("--ffn-hidden-size", type=int, default=None, help="default 8E/3 rounded up to a multiple of 32")
    p.add_argument("--vocab-size", type=int, default=None, help="default 32000")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16")
    p.add_argument("--attention", choices=ATTENTIONS, default="flash")
    p.add_argument("--optimizer", choices=list(OPTIMIZER_STATES), default="adamw")
    p.add_argument("--param-sharding", choices=PARAM_SHARDINGS, default="replicated")
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--memory-budget-gb", type=float, default=80.0, help="GiB per rank (default 80)")
    p.add_argument(
        "--activation-checkpointing",
        nargs="?",
        choices=ACTIVATION_CHECKPOINTING,
        const=True,
        default=False,
        help="none, full (keep each layer's input) or selective (recompute the MLP); the flag alone means full",
    )
    p.add_argument(
        "--loss-chunk-size",
        type=parse_tokens,
        default=None,
        help="tokens per tile of the chunked LM-head loss (default: whole logits)",
    )
    p.add_argument(
        "--mlp-tile-size",
        type=parse_tokens,
        default=None,
        help="tokens per tile of the sequence-tiled MLP (default: untiled)",
    )
    p.add_argument(
        "--master-dtype",
        choices=list(DTYPE_BYTES),
        default=None,
        help="dtype of the stored weights, gradients and optimizer state when wider than --dtype "
        "(fp32 with --dtype bf16: FSDP mixed precision); default --dtype",
    )
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument(
        "--no-weights",
        dest="include_weights",
        action="store_false",
        help="count activations only (no weights, gradients or optimizer state)",
    )
    p.add_argument("--json", action="store_true", help="print the estimator's dict as JSON")
    p.set_defaults(func=_run_estimate)


def _run_estimate(args: argparse.Namespace) -> str:
    kwargs = {k: v for k, v in vars(args).items() if k not in ("func", "json", "command")}
    result = estimate_context_parallel_memory_savings(**kwargs)
    return json.dumps(result, indent=2) if args.json else format_estimate(result)


def format_estimate(result: dict) -> str:
    """The estimator's dict as a readable table (GiB per rank)."""
    cfg, p = result["config"], result["config"]["cp_size"]
    without, with_cp = result["breakdown_gb"]["without_cp"], result["breakdown_gb"]["with_cp"]
    head = f"{'GiB per rank':<22}{'P = 1':>12}{f'P = {p}':>12}"
    rows = [f"{name:<22}{without[name]:>12.3f}{with_cp[name]:>12.3f}" for name in without]
    rows += [
        "-" * len(head),
        f"{'total (peak)':<22}{result['without_cp_gb']:>12.3f}{result['with_cp_gb']:>12.3f}",
        f"{'peak at':<22}{result['peak_phase']['without_cp']:>12}{result['peak_phase']['with_cp']:>12}"
        if max(map(len, result["peak_phase"].values())) <= 11
        else f"{'peak at':<22}{result['peak_phase']['without_cp']} | {result['peak_phase']['with_cp']}",
        f"{'activations / layer':<22}{result['activations_per_layer_gb']['without_cp']:>12.3f}"
        f"{result['activations_per_layer_gb']['with_cp']:>12.3f}",
    ]
    gain = result["max_seq_len_with_cp"] / result["max_seq_len_without_cp"] if result["max_seq_len_without_cp"] else 0
    title = (
        f"L = {cfg['seq_len']:,}, B = {cfg['batch_size']}, E = {cfg['hidden_size']}, N = {cfg['num_layers']}, "
        f"H = {cfg['num_heads']}/{cfg['num_kv_heads']}, F = {cfg['ffn_hidden_size']}, V = {cfg['vocab_size']}\n"
        f"{cfg['dtype']}, attention={cfg['attention']}, optimizer={cfg['optimizer']}"
        + "".join(f", {text}" for text in _option_words(cfg))
    )
    summary = [
        f"savings: {result['savings_gb']:.3f} GiB per rank ({result['reduction_factor']:.2f}x in total, "
        f"{result['activation_reduction_factor']:.2f}x in activations)",
        f"longest sequence within {cfg['memory_budget_gb']:g} GiB per rank:",
        f"  {result['max_seq_len_without_cp']:,} tokens without CP, "
        f"{result['max_seq_len_with_cp']:,} with cp_size={p} ({gain:.2f}x)",
    ]
    return "\n".join([title, "", head, *rows, "", *summary])


def _option_words(cfg: dict) -> list[str]:
    """The non-default options of an estimate, in words, for the table's title."""
    words = []
    if cfg["master_dtype"] not in (None, cfg["dtype"]):
        words.append(f"{cfg['master_dtype']} master state")
    if cfg["param_sharding"] != "replicated":
        words.append(f"{cfg['param_sharding']} over dp {cfg['dp_size']} x cp")
    ac = cfg["activation_checkpointing"]
    if ac not in (False, "none"):
        words.append("activation checkpointing" + ("" if ac is True else f" ({ac})"))
    if cfg["loss_chunk_size"] is not None:
        words.append(f"loss in chunks of {cfg['loss_chunk_size']:,}")
    if cfg["mlp_tile_size"] is not None:
        words.append(f"MLP in tiles of {cfg['mlp_tile_size']:,}")
    return words


def _add_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="the best dp x cp x tp, attention strategy and memory options for a job",
        description="Search every layout and memory option the engine runs, keep those that fit the memory "
        "budget, rank them by predicted time per token. Model: --config (a transformers config.json, read "
        "locally) or the shape flags. Models: cp_dtensor.estimate.planner.",
    )
    p.add_argument("--config", default=None, help="a Hugging Face config.json (or its folder); read, never downloaded")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None, help="default hidden_size // 128")
    p.add_argument("--num-kv-heads", type=int, default=None, help="GQA; default num_heads")
    p.add_argument("--ffn-hidden-size", type=int, default=None, help="default 8E/3 rounded up to a multiple of 32")
    p.add_argument("--vocab-size", type=int, default=None, help="default 32000")
    p.add_argument("--seq-len", type=parse_tokens, required=True, help="tokens per sequence (128K = 131072)")
    p.add_argument("--world-size", type=int, required=True, help="devices in all")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--device", choices=list(DEVICES), default="H100")
    p.add_argument("--memory-budget-gb", type=float, default=None, help="GiB per device (default: the device's)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per dp replica per step")
    p.add_argument("--efficiency", type=float, default=0.4, help="fraction of peak FLOP/s reached (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak TFLOP/s")
    p.add_argument("--intra-node-gbps", type=float, default=None, help="override: GB/s to a peer in the node")
    p.add_argument("--inter-node-gbps", type=float, default=None, help="override: GB/s to another node")
    p.add_argument("--loss-chunk-size", type=parse_tokens, default=4096, help="tile of the chunked loss (tokens)")
    p.add_argument("--mlp-tile-size", type=parse_tokens, default=4096, help="tile of the tiled MLP (tokens)")
    p.add_argument("--runners-up", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the whole result (every rejection) as JSON")
    p.set_defaults(func=_run_plan)


def _plan_dims(args: argparse.Namespace) -> ModelDims:
    if args.config is not None:
        return dims_from_config(args.config)
    if args.hidden_size is None or args.num_layers is None:
        raise ValueError("plan needs the model: --config PATH, or --hidden-size and --num-layers (and the rest).")
    shape = (args.num_heads, args.num_kv_heads, args.ffn_hidden_size, args.vocab_size, False)
    return _resolve_dims(args.hidden_size, args.num_layers, *shape)


def _run_plan(args: argparse.Namespace) -> str:
    import dataclasses

    device = DEVICES[args.device]
    overrides = {"peak_flops": args.peak_tflops and args.peak_tflops * 1e12}
    overrides |= {"intra_node_gbps": args.intra_node_gbps and args.intra_node_gbps * 1e9}
    overrides |= {"inter_node_gbps": args.inter_node_gbps and args.inter_node_gbps * 1e9}
    device = dataclasses.replace(device, **{k: v for k, v in overrides.items() if v})
    result = plan(
        _plan_dims(args),
        seq_len=args.seq_len,
        world_size=args.world_size,
        gpus_per_node=args.gpus_per_node,
        device=device,
        memory_budget_gib=args.memory_budget_gb,
        batch_size=args.batch_size,
        efficiency=args.efficiency,
        loss_chunk_size=args.loss_chunk_size,
        mlp_tile_size=args.mlp_tile_size,
        num_runners_up=args.runners_up,
    )
    return result.to_json() if args.json else format_plan(result)


def build_parser() -> argparse.ArgumentParser:
    """The ``cp-dtensor`` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="cp-dtensor", description="Context parallelism for PyTorch: tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_estimate(subparsers)
    _add_plan(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cp-dtensor``; returns the exit status (2 with a message for invalid arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        print(args.func(args))
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
