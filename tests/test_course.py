"""What the course's pages promise a learner, beyond running: no project history, readable figures,
the estimator's units.

* ``test_no_provenance_on_learner_pages[<page>]``: no commit hash, load average or other word of the
  project's own history on a page of the site; that goes to ``bench/README.md`` (the maintainers'
  appendix), which names the command, machine, commit and load of every figure.
* ``test_figures_are_shown_at_readable_size[<page>]``: every image a page shows is drawn at no less
  than ``MIN_SCALE`` of its natural size in the text column of a 1280 px window, so its labels keep
  the size its script gave them (the figure scripts use 8 pt and up at 120 dpi: 13 px at full size).
* ``test_memory_units_are_the_estimators``: the estimator reports GiB and counts a fixed number of
  bytes per parameter; the example and the pages say the same.

The pages and their blocks are read with ``tests/test_docs.py``'s parser.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from docs_examples import run_example
from test_docs import DOCS, PAGES, page_id, parse_blocks

# ---- provenance ------------------------------------------------------------------------------------

# Pages of docs/ written for maintainers, exempt from the check below (none: bench/README.md and
# ARCHITECTURE.md hold what maintainers need, outside the site).
MAINTAINER_PAGES: frozenset[str] = frozenset()
LEARNER_PAGES = [p for p in PAGES if p.name not in MAINTAINER_PAGES]

# 7 to 40 hex digits with at least one letter and one digit: an abbreviated or full git hash.
# (Decimal numbers have no letter; hex words such as "decade" have no digit.)
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
PROVENANCE_WORDS = re.compile(
    r"(?i)\b(load averages?|work-in-progress|uncommitted|clean commit|(?:at|of) commit"
    r"|we have not|not (?:yet )?traced|not done yet|the production page|(?:re-)?measured later)\b"
)


def provenance_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every line with a commit hash or a provenance word."""
    return [
        (n, line)
        for n, line in enumerate(text.splitlines(), 1)
        if COMMIT_HASH.search(line) or PROVENANCE_WORDS.search(line)
    ]


def test_the_provenance_check_sees_hashes_and_words_and_nothing_else() -> None:
    flagged = [
        "code of commit `2d16121`",
        "measured at 55c4f3d on the H200",
        "a full hash 3a3bbe8f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f",
        "1-min load average 14.8 at start",
        "a work-in-progress state after the change",
        "but we have not traced it on the GPU",
        "see the production page",
    ]
    clean = [
        "max abs err 1.9e-06 and 2.4e-15",
        "131,072 tokens, 1234567 bytes, 0x7f",
        "the accumulators decade by decade, deadbeef",
        "colour #1f77b4 and 16 bytes per parameter",
        "the ring commits to nothing",
    ]
    assert [line for line in flagged if not provenance_lines(line)] == []
    assert [line for line in clean if provenance_lines(line)] == []


@pytest.mark.parametrize("page", LEARNER_PAGES, ids=page_id)
def test_no_provenance_on_learner_pages(page: Path) -> None:
    """The page names the command and the machine of its numbers; commits, load averages and the
    project's history go to bench/README.md."""
    found = [f"{page.name}:{n}: {line.strip()}" for n, line in provenance_lines(page.read_text())]
    assert not found, "provenance on a learner page (move it to bench/README.md):\n" + "\n".join(found)


# ---- figures -----------------------------------------------------------------------------------------

# The text column of a page in a 1280 px window (docs/assets/stylesheets/layout.css widens Material's
# grid; measured in Chromium: the article's content box). An image wider than this is scaled down to it.
CONTENT_WIDTH_AT_1280 = 733
MIN_SCALE = 0.8  # below this, 8 pt labels at 120 dpi (13 px) fall under 10 px on screen
IMAGE = re.compile(r"!\[[^\]]*\]\((?P<path>[^)\s]+\.(?:png|gif|jpe?g))\)")


def shown_images(page: Path) -> list[Path]:
    """The image files a page shows (``![alt](path)``), outside code blocks."""
    text = page.read_text()
    lines = text.splitlines()
    for block in parse_blocks(text):  # drop fenced code: a path in a command is not an image
        for i in range(block.first_line - 2, block.first_line - 1 + block.body.count("\n") + 1):
            lines[i] = ""
    return [(page.parent / m["path"]).resolve() for m in IMAGE.finditer("\n".join(lines))]


def rendered_scale(image: Path) -> float:
    """The scale an image is drawn at in the text column at 1280 px (``max-width: 100%``)."""
    from PIL import Image

    with Image.open(image) as im:
        width = im.size[0]
    return min(1.0, CONTENT_WIDTH_AT_1280 / width)


@pytest.mark.parametrize("page", [p for p in PAGES if shown_images(p)], ids=page_id)
def test_figures_are_shown_at_readable_size(page: Path) -> None:
    small = [
        f"{img.relative_to(DOCS)}: drawn at {rendered_scale(img):.2f} of its size"
        for img in shown_images(page)
        if rendered_scale(img) < MIN_SCALE
    ]
    assert not small, (
        f"figures narrower than {CONTENT_WIDTH_AT_1280 / MIN_SCALE:.0f} px keep their labels readable "
        "at 1280 px; redraw these narrower (figsize) or taller:\n" + "\n".join(small)
    )


def test_the_figure_check_reads_images_from_pages_and_not_from_code(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (1400, 300)).save(tmp_path / "wide.png")
    Image.new("RGB", (700, 300)).save(tmp_path / "narrow.png")
    page = tmp_path / "page.md"
    page.write_text("![a](wide.png)\n\n```bash\necho ![b](narrow.png)\n```\n\n![c](narrow.png)\n")
    assert [p.name for p in shown_images(page)] == ["wide.png", "narrow.png"]
    assert rendered_scale(tmp_path / "wide.png") < MIN_SCALE <= rendered_scale(tmp_path / "narrow.png") == 1.0


# ---- units ---------------------------------------------------------------------------------------------

BYTES_PER_PARAMETER = re.compile(r"(\d+) bytes per parameter in (bf16|fp16|fp32)")


def estimator_bytes_per_parameter(dtype: str) -> float:
    """Weights, gradients and AdamW's two moments per parameter, as the estimator counts them."""
    from cp_dtensor.estimate.memory import ModelDims, estimate_rank_memory

    dims = ModelDims(256, 2, 4, 4, 704, vocab_size=256)
    est = estimate_rank_memory(dims, seq_len=64, batch_size=1, cp_size=1, dtype=dtype)
    static = sum(est.components[k] for k in ("weights", "grads", "optimizer_state"))
    return static / dims.num_params()


def test_memory_units_are_the_estimators() -> None:
    """The estimator reports GiB (2**30 bytes); docs/examples/memory_estimate.py prints its numbers as
    GiB, and every "N bytes per parameter in <dtype>" on a page is what the estimator counts."""
    from cp_dtensor.estimate import memory

    assert memory.GIB == 2**30 and "GiB" in memory.__doc__
    proc = run_example("memory_estimate.py").proc  # the session's one run of it (tests/docs_examples.py)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"\d GiB", out) and not re.search(r"\bGB\b", out), out
    claims = [(page.name, m) for page in PAGES for m in BYTES_PER_PARAMETER.finditer(page.read_text())]
    assert any(name == "scaling-out.md" for name, _ in claims), "scaling-out.md states bytes per parameter"
    wrong = [
        f"{name}: {m[0]} (the estimator: {estimator_bytes_per_parameter(m[2]):g})"
        for name, m in claims
        if int(m[1]) != estimator_bytes_per_parameter(m[2])
    ]
    assert not wrong, "\n".join(wrong)


# ---- the table of contents -------------------------------------------------------------------------------


def test_long_names_in_the_contents_break_at_underscores_and_words() -> None:
    """docs/scripts/hook_toc_breaks.py: a zero-width space after inner underscores and inside CamelCase
    names of a title's text, never inside a tag (the API page's contents wrap long names there)."""
    sys.path.insert(0, str(DOCS / "scripts"))
    try:
        from hook_toc_breaks import ZERO_WIDTH_SPACE as Z
        from hook_toc_breaks import breakable
    finally:
        sys.path.remove(str(DOCS / "scripts"))
    title = '<code class="doc_symbol doc-symbol-toc">func</code>&nbsp;estimate_memory RingPlan _private'
    assert breakable(title) == (
        f'<code class="doc_symbol doc-symbol-toc">func</code>&nbsp;estimate_{Z}memory Ring{Z}Plan _private'
    )
