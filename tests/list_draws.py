"""List what each multi-rank property test really runs: its fixed covering cases and hypothesis's draws.

    python tests/list_draws.py                      # the CI profile (derandomized)
    HYPOTHESIS_PROFILE=thorough python tests/list_draws.py

Runs the property tests with ``CP_LIST_DRAWS`` set: each test records its configuration and returns
before starting any rank (``helpers.record_draw``), so the listing takes seconds and shows exactly
the draws a real run makes (hypothesis derandomizes by the test's code, which the flag does not
change). Prints, per test, how many cases it runs and how often each value of each factor appears,
then the values of the factors that matter that no case reaches.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_ring.py::test_ring_matches_full_attention_covering",
    "tests/test_ring.py::test_ring_matches_full_attention",
    "tests/test_strategies.py::test_strategy_covering_cases",
    "tests/test_strategies.py::test_strategy_matches_full_attention_and_sends_the_model_bytes",
    "tests/test_masks.py::test_masked_attention_covering_cases",
    "tests/test_masks.py::test_masked_attention_matches_dense_mask",
]
EXPECTED = {  # the values each factor must reach (within a test file, fixed cases and draws together)
    "dtype": {"float64", "float32", "bfloat16"},
    "causal": {True, False},
    "P": {1, 2, 3, 4},
    "attention": {"MHA", "GQA", "MQA"},
}


def factors(cfg: dict) -> dict:
    """The factors of one case, in comparable words."""
    layout = cfg.get("layout")
    heads, kv = cfg.get("heads"), cfg.get("kv_heads")
    out = {
        "strategy": cfg.get("strategy", "ring"),
        "P": cfg.get("P"),
        "layout": "documents" if isinstance(layout, str) and layout.startswith("DocumentZigzag") else layout,
        "causal": cfg.get("causal"),
        "dtype": cfg.get("dtype"),
        "attention": "MHA" if heads == kv else "MQA" if kv == 1 else "GQA",
    }
    if "mask" in cfg:
        out["mask"] = cfg["mask"]
        out["tile"] = cfg.get("tile")
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "draws.jsonl"
        env = {**os.environ, "CP_LIST_DRAWS": str(path)}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        records = [json.loads(line) for line in path.read_text().splitlines()]
    by_test = collections.defaultdict(list)
    for r in records:
        by_test[r["test"].split("[")[0]].append(factors(r["cfg"]))
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    print(f"# What the property tests run (profile {profile!r}, {len(records)} cases)\n")
    by_file = collections.defaultdict(list)
    for test, cases in by_test.items():
        by_file[test.split("::")[0]] += cases
        print(f"## {test}: {len(cases)} cases")
        for name in cases[0]:
            counts = collections.Counter(str(c[name]) for c in cases)
            print(f"- {name}: " + ", ".join(f"{v} x{n}" for v, n in sorted(counts.items())))
        core = collections.Counter((c["layout"], c["causal"], c["dtype"]) for c in cases)
        print(
            f"- layout x causal x dtype: {len(core)} of the combinations drawn; causal zigzag per dtype: "
            + ", ".join(f"{d} x{core[('zigzag', True, d)]}" for d in ("float64", "float32", "bfloat16"))
        )
        print()
    print("## Values never reached (fixed cases and draws of one file together)")
    missing_any = False
    for file, cases in by_file.items():
        for name, want in EXPECTED.items():
            if file.endswith("test_strategies.py") and name == "P":
                want = {2, 4}  # Ulysses and hybrid need P | heads; the ring file covers P = 1 and 3
            missing = want - {c[name] for c in cases}
            if missing:
                missing_any = True
                print(f"- {file}: {name} never {sorted(map(str, missing))}")
    if not missing_any:
        print("- none")


if __name__ == "__main__":
    main()
