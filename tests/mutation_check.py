"""Break the library on purpose, five ways, and show which tests catch each break.

    OMP_NUM_THREADS=1 python tests/mutation_check.py            # all five (a few minutes on 2 cores)
    OMP_NUM_THREADS=1 python tests/mutation_check.py merge-sign  # one of them

Each mutation is applied to a COPY of the working tree in a temporary directory (never to the tree
itself); the tests relevant to it then run against the copy (``PYTHONPATH`` and the working
directory put the copy's ``cp_dtensor`` first, which the script checks). A mutation is caught when at
least one of its tests fails. The script prints which tests failed for each and exits non-zero if a
mutation survives. A mutation whose text is no longer found in the library (the code moved or
changed) is reported as an error: update its ``before`` text.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """Replace ``before`` with ``after`` in the one library file that contains it; run ``tests``."""

    name: str
    what: str
    before: str
    after: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "merge-sign",
        "the LSE merge moves the running output away from the block's instead of towards it",
        "out.sub_(torch.sigmoid(diff).unsqueeze(-1) * (out - block_out.to(out.dtype)))",
        "out.add_(torch.sigmoid(diff).unsqueeze(-1) * (out - block_out.to(out.dtype)))",
        ("tests/test_ring.py::test_ring_matches_full_attention_covering", "tests/test_kernels.py"),
    ),
    Mutation(
        "causal-offset",
        "the causal plan treats the key chunk right after the queries as already seen (one chunk off)",
        "elif kv_start + kv_len - 1 <= q_start:",
        "elif kv_start <= q_start + q_len:",
        (
            "tests/test_ring.py::test_ring_matches_full_attention_covering",
            "tests/test_masks.py::test_document_zigzag_in_every_strategy",
        ),
    ),
    Mutation(
        "zigzag-order",
        "rank r takes chunks r and P + r (a valid split, but not the zigzag that balances causal work)",
        "return [(rank * chunk, chunk), ((2 * world_size - 1 - rank) * chunk, chunk)]",
        "return [(rank * chunk, chunk), ((world_size + rank) * chunk, chunk)]",
        (
            "tests/test_layout.py",
            "tests/test_ring.py::test_ring_matches_full_attention_covering",
            "tests/test_ring.py::test_ring_sends_exactly_the_expected_blocks",
        ),
    ),
    Mutation(
        "grad-sync-average",
        "the DDP hook averages the gradients over dp x cp instead of summing them",
        "work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)",
        "work = dist.all_reduce(bucket.buffer().div_(dist.get_world_size(group)), group=group, async_op=True)",
        (
            "tests/test_model.py::test_dp2_cp2_step_equals_one_process_step",
            "tests/test_model.py::test_seed_training_example_sums_gradients_over_dp_and_cp",
        ),
    ),
    Mutation(
        "validation-dropped",
        "attention no longer checks that causal is a bool (causal=1 runs as if it were True)",
        'if not isinstance(causal, bool):\n        raise ValueError(f"causal must be a bool, got {causal!r}.")',
        "if False:\n        pass",
        (
            "tests/test_fuzz.py::test_every_strategy_rejects_invalid_arguments",
            "tests/test_strategies.py::test_bad_input_is_a_value_error_on_every_rank",
        ),
    ),
]

IGNORE = shutil.ignore_patterns(".git", ".venv", "site", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info")


def copy_tree(dest: Path) -> Path:
    """The working tree (tracked and untracked files, no venv or caches) copied to ``dest``."""
    shutil.copytree(REPO, dest, ignore=IGNORE)
    return dest


def apply(mutation: Mutation, root: Path) -> Path:
    """Patch the one file under ``root/cp_dtensor`` that contains ``mutation.before`` (exactly once)."""
    hits = [p for p in (root / "cp_dtensor").rglob("*.py") if mutation.before in p.read_text()]
    if len(hits) != 1 or hits[0].read_text().count(mutation.before) != 1:
        raise SystemExit(f"{mutation.name}: its text is found in {len(hits)} files, not once; update the mutation")
    hits[0].write_text(hits[0].read_text().replace(mutation.before, mutation.after))
    return hits[0]


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, list[str], str]:
    """Run ``tests`` in ``root``; return (exit status, ids of the failed tests, output tail)."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import cp_dtensor; print(cp_dtensor.__file__)"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(root)), f"the tests would import {where}, not the mutated copy"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    failed = sorted(set(re.findall(r"^FAILED (\S+)", proc.stdout, re.M)))
    return proc.returncode, failed, proc.stdout[-1500:]


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    survivors = []
    for mutation in chosen:
        with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
            root = copy_tree(Path(tmp) / "tree")
            path = apply(mutation, root)
            start = time.monotonic()
            status, failed, tail = run_tests(root, mutation.tests)
            seconds = time.monotonic() - start
        caught = status != 0 and bool(failed)
        print(f"## {mutation.name}: {'CAUGHT' if caught else 'NOT CAUGHT'} ({seconds:.0f} s)")
        print(f"- break: {mutation.what} ({path.relative_to(root)})")
        print(f"- tests run: {', '.join(mutation.tests)}")
        by_test = collections.Counter(t.split("[")[0] for t in failed)
        print(f"- failed: {len(failed)}" + "".join(f"\n  - {t}: {n} failed" for t, n in sorted(by_test.items())))
        if not caught:
            survivors.append(mutation.name)
            print(tail)
        print(flush=True)
    print(
        f"{len(chosen) - len(survivors)} of {len(chosen)} mutations caught"
        + (f"; survivors: {survivors}" if survivors else "")
    )
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
