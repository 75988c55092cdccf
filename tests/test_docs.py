"""The documentation's code runs: every page, every example file, the site build, the figures.

What runs, and how (one test per item):

* ``test_page[<page>]``: the ```python fenced blocks of one ``docs/*.md`` page run in order, in one
  namespace, as the reader would paste them into one file, run in a fresh interpreter from an empty
  directory (``docs/scripts/run_page.py``), so they may use only what ``pip install`` installs.
  A block that prints must be followed directly by a ```text title="Output"``` block showing what
  it prints (``...`` in a line stands for any text, as in doctest). Tracebacks point at the line of
  the ``.md`` file. The one exception: a block whose body only includes files of
  ``docs/examples/`` (``--8<-- "docs/examples/x.py"``) and is marked, by a ``title="..."`` on its
  fence or a ``<!-- no-run -->`` line right before it, is not run with the page; such (multi-rank)
  files are run on their own by ``test_example``. ``<!-- no-run -->`` on any other block is an
  error, so a page cannot quietly skip code it shows. Unmarked includes are expanded and run.
* ``test_code_fits_the_column[<page>]``: no code line a page shows (included files too) is wider than
  88 columns, what a code block shows at 1280 px without scrolling.
* ``test_page_speaks_to_learners[<page>]``: no project history or plans in a tutorial page.
* ``test_example[<file>]``: every ``docs/examples/*.py`` runs with the command written in its
  module docstring (the line starting ``torchrun`` or ``python``), so the command a reader copies
  is the command that is tested.
* ``test_mkdocs_build_strict``: ``mkdocs build --strict`` succeeds with no WARNING or ERROR in its
  log and the built HTML/CSS references nothing outside the site (the pages must render offline).
  It fails, rather than skips, when mkdocs is missing: CI installs the ``docs`` extra.
* ``test_api_page_renders_examples_and_returns``: the API page's HTML shows docstring examples as
  code, each Returns section as one value, no source listings and no raw Sphinx roles.
* ``test_api_page_has_every_name_the_course_imports``: every name a page or example imports from
  ``cp_dtensor`` or ``reference`` resolves as an autorefs link under the path it is imported by.
* ``test_the_build_fails_on_a_broken_link_and_on_a_docstring_warning``: strictness is real: a copy of
  the docs with a broken link, and one with a docstring griffe warns about, both fail to build.
* ``test_site_in_headless_browser``: the built pages open in headless Chromium with every formula
  rendered, every image shown and no request leaving the machine (``docs/scripts/check_site.py``);
  skipped only where no Chromium is installed. In the same run, at 1280 px:
  ``test_nothing_wider_than_its_box_at_1280px`` (no code block, table, equation or page wider than
  its box), and ``test_width_check_reports_wide_elements_and_only_those`` shows that check
  can fail and is not fooled. ``test_search_works_from_file_urls``: the site's search works opened from disk.
* ``test_figures_regenerate``: ``docs/scripts/make_figures.py`` runs and writes every figure that
  is committed under ``docs/assets/figures/``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import warm_launch
import work_limits
from docs_examples import run_example

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
EXAMPLES = DOCS / "examples"
FIGURES = DOCS / "assets" / "figures"

PAGES = sorted(DOCS.glob("*.md"))
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.py"))

FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)(?P<info>.*)$")
SNIPPET = re.compile(r"""^\s*-{1,}8<-{1,}\s+["']?(?P<path>[^"'\s]+)["']?\s*$""")
NO_RUN = "<!-- no-run -->"


@dataclass
class Block:
    """One fenced code block of a page."""

    lang: str
    info: str
    body: str
    first_line: int  # 1-based line of the .md file where the body starts
    no_run: bool


def parse_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a markdown page, in order (fences may be indented, e.g. in admonitions)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        prev = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        body, j = [], i + 1
        close = re.compile(rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        while j < len(lines) and not close.match(lines[j]):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        assert j < len(lines), f"unclosed code fence opened at line {i + 1}"
        blocks.append(Block(m["lang"].lower(), m["info"], "\n".join(body) + "\n", i + 2, prev == NO_RUN))
        i = j + 1
    return blocks


def included_examples(block: Block) -> list[Path] | None:
    """The docs/examples files a block includes, or None if the block is not purely includes."""
    paths = []
    for line in block.body.splitlines():
        if not line.strip():
            continue
        m = SNIPPET.match(line)
        if not m:
            return None
        paths.append((REPO / m["path"]).resolve())
    return paths or None


def expand_snippets(block: Block) -> str:
    """The block's code with each ``--8<-- "file"`` line replaced by the file's text."""
    out = []
    for line in block.body.splitlines():
        m = SNIPPET.match(line)
        out.append((REPO / m["path"]).read_text() if m else line)
    return "\n".join(out) + "\n"


def page_id(path: Path) -> str:
    return path.name


def runnable_code(block: Block, where: str) -> str | None:
    """The code of a python block to run with its page, or None for an example run on its own.

    A block that only includes files of docs/examples/ and is marked (``title=`` on its fence or
    ``<!-- no-run -->`` before it) is left to ``test_example``. Unmarked includes are expanded and
    run here. A titled block with its own code simply runs.

    Raises:
        ValueError: ``<!-- no-run -->`` on a block that is not purely an include of docs/examples.
    """
    includes = included_examples(block)
    is_example = bool(includes) and all(p.parent == EXAMPLES and p.is_file() for p in includes)
    if block.no_run and not is_example:
        raise ValueError(
            f"{where}: {NO_RUN} is only for a block that includes a docs/examples/ file "
            "(which test_example runs); this block must run"
        )
    if is_example and (block.no_run or "title=" in block.info):
        return None
    return expand_snippets(block) if includes else block.body


OUTPUT_INFO = re.compile(r"""\btitle=["']Output["']""")
MAX_CODE_COLUMNS = 88  # what a code block shows without scrolling at 1280 px (checked in the browser too)
RUN_PAGE = DOCS / "scripts" / "run_page.py"


@dataclass
class Step:
    """A python block to run, with the Output block that shows what it prints (if any)."""

    block: Block
    code: str
    shown: Block | None


def is_output(block: Block) -> bool:
    """Whether a block is a page's ```text title="Output"``` block."""
    return block.lang == "text" and bool(OUTPUT_INFO.search(block.info))


def adjacent(lines: list[str], a: Block, b: Block) -> bool:
    """Whether only blank lines stand between block ``a``'s closing fence and block ``b``'s opening one."""
    end = a.first_line + a.body.count("\n")  # the 0-based line after a's closing fence
    return not any(ln.strip() for ln in lines[end : b.first_line - 2])


def page_steps(text: str, where: str) -> list[Step]:
    """The runnable python blocks of a page, each with the ```text title="Output"``` block right after it.

    "Right after" means the next fenced block, with nothing but blank lines between.
    """
    blocks = parse_blocks(text)
    lines = text.splitlines()
    steps = []
    for i, block in enumerate(blocks):
        if block.lang not in ("python", "py"):
            continue
        code = runnable_code(block, f"{where}:{block.first_line}")
        if code is None:
            continue
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        shown = nxt if nxt and is_output(nxt) and adjacent(lines, block, nxt) else None
        steps.append(Step(block, code, shown))
    return steps


# A number in scientific notation below 1e-9: a rounding-level error, whose digits depend on the CPU's
# vector width and summation order; the pages print them to show the size, so any two compare equal
# (a page may also write one as ``...e-15``).
ROUNDING_LEVEL = re.compile(r"(?:\.\.\.|\b\d(?:\.\d+)?)e-0*[1-9]\d+\b")


def output_matches(shown: str, printed: str) -> bool:
    """Whether a page's Output block shows what the block printed.

    ``...`` in a line stands for any text (doctest's ELLIPSIS); trailing spaces are ignored; numbers
    below 1e-9 written in scientific notation (rounding-level errors) match each other.
    """
    import doctest

    def norm(text: str) -> str:
        text = ROUNDING_LEVEL.sub("<rounding>", text)
        return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()) + "\n"

    return doctest.OutputChecker().check_output(norm(shown), norm(printed), doctest.ELLIPSIS)


def run_page(page: Path, cwd: Path, python: str = sys.executable) -> tuple[list[Step], dict]:
    """Run a page's blocks in a fresh interpreter (``python``, default this one's: then a fresh fork of
    one that has only imported torch and cp_dtensor, tests/warm_launch.py) in ``cwd``, with no
    repository file importable.

    ``python -P`` keeps the runner's own directory off ``sys.path`` and ``PYTHONPATH`` is dropped, so the
    blocks see what ``pip install`` installed (``cp_dtensor``, ``reference``), not ``bench/``, ``tests/``
    or ``docs/``: a block that passes here runs when a reader saves the page as a file anywhere.
    """
    import json

    steps = page_steps(page.read_text(), page.name)
    blocks = [{"code": s.code, "first_line": s.block.first_line, "page": str(page)} for s in steps]
    (cwd / "blocks.json").write_text(json.dumps(blocks))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MPLBACKEND"] = "Agg"
    argv = [python, "-P", RUN_PAGE, "blocks.json", "result.json"]
    # This interpreter's runs are forks of the preloaded server (tests/warm_launch.py), with the same path.
    launch = warm_launch.run if python == sys.executable else work_limits.run
    proc = launch(argv, cpu_s=600, cwd=cwd, env=env)
    assert proc.returncode == 0, f"{page.name}: the page runner failed:\n{proc.stdout}\n{proc.stderr}"
    return steps, json.loads((cwd / "result.json").read_text())


def page_problems(page: Path, cwd: Path, python: str = sys.executable) -> list[str]:
    """Why a page's blocks fail as a reader would run them (with ``python``): a raised error, a printing
    block without its Output block, or an Output block that does not match what the block printed."""
    steps, result = run_page(page, cwd, python)
    problems = []
    for step, printed in zip(steps, result["outputs"]):
        where = f"{page.name}:{step.block.first_line}"
        if step.shown is None:
            if printed.strip():
                problems.append(
                    f'{where}: the block prints, but no ```text title="Output"``` block follows it:\n{printed}'
                )
        elif not output_matches(step.shown.body, printed):
            problems.append(
                f"{where}: the Output block does not match.\nShown:\n{step.shown.body}\nPrinted:\n{printed}"
            )
    if result["error"]:
        problems.append(f"{page.name}: a block raised:\n{result['error']}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page(page: Path, tmp_path: Path) -> None:
    """The page's python blocks run, from an empty directory, and every printing block shows its output."""
    problems = page_problems(page, tmp_path)
    assert not problems, "\n\n".join(problems)


def code_lines(page: Path) -> list[tuple[str, str]]:
    """``(where, line)`` for every line a page shows in a code block, included files expanded."""
    found = []
    for block in parse_blocks(page.read_text()):
        for n, line in enumerate(block.body.splitlines()):
            m = SNIPPET.match(line)
            if m:
                path = REPO / m["path"]
                found += [(f"{m['path']}:{k}", ln) for k, ln in enumerate(path.read_text().splitlines(), 1)]
            else:
                found.append((f"{page.name}:{block.first_line + n}", line))
    return found


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_code_fits_the_column(page: Path) -> None:
    """No code line a page shows (its blocks and the files it includes) is wider than MAX_CODE_COLUMNS."""
    wide = [
        f"{where} ({len(line)} columns): {line}" for where, line in code_lines(page) if len(line) > MAX_CODE_COLUMNS
    ]
    assert not wide, f"{len(wide)} code lines wider than {MAX_CODE_COLUMNS} columns:\n" + "\n".join(wide[:40])


# Words of the project's own history and plans, which a learner has no use for (they go to bench/README.md).
AUTHOR_FACING = re.compile(
    r"(?i)\b(design card|seed card|the seed's|seed claims?|still to come|uncommitted"
    r"|the issue asks|targets? (?:met|missed))\b"
)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_speaks_to_learners(page: Path) -> None:
    found = [
        f"{page.name}:{n}: {line.strip()}"
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if AUTHOR_FACING.search(line)
    ]
    assert not found, "author-facing words in a tutorial page:\n" + "\n".join(found)


def test_runner_checks_outputs_and_runs_elsewhere(tmp_path: Path) -> None:
    """The runner can fail: a wrong Output block, a missing one, and a repository import all fail a page."""
    page = tmp_path / "page.md"
    good = (
        'Text.\n\n```python\nprint("a", 1)\nprint("t = 0.123 s")\n```\n\n```text title="Output"\na 1\nt = ... s\n```\n'
    )
    page.write_text(good)
    (tmp_path / "run").mkdir()
    steps, result = run_page(page, tmp_path / "run")
    assert result["error"] is None and output_matches(steps[0].shown.body, result["outputs"][0])
    assert not output_matches("a 2\nt = ... s\n", result["outputs"][0])
    assert output_matches("err 9.4e-16\n", "err 2.1e-15\n") and output_matches("x 1e-12", "x 3.0e-10")
    assert output_matches("err ...e-15\n", "err 2.2e-15\n")
    assert not output_matches("err 9.4e-16\n", "err 2.1e-05\n") and not output_matches("x 1e-9", "x 1e-8")
    cases = {
        "wrong output": (good.replace("a 1", "a 2"), "does not match"),
        "no output block": (good.replace('text title="Output"', "text"), "no ```text"),
        "repository import": ("```python\nimport bench.report\n```\n", "No module named 'bench'"),
        "repository file": ("```python\nopen('docs/assets/data/train_curve.json')\n```\n", "FileNotFoundError"),
        "a raise": ("```python\nraise SystemExit(0)\n```\n", "SystemExit"),
    }
    for name, (text, expected) in cases.items():
        page.write_text(text)
        problems = page_problems(page, tmp_path / "run")
        assert any(expected in p for p in problems), f"{name}: not caught: {problems}"


def shown_example_outputs() -> dict[Path, list[tuple[str, Block]]]:
    """For each docs/examples file, the Output blocks shown right under its include on a page.

    "Right under" allows the ```bash block with the command that runs it in between; nothing but
    blank lines may separate the blocks.
    """
    shown: dict[Path, list[tuple[str, Block]]] = {}
    for page in PAGES:
        text = page.read_text()
        blocks = parse_blocks(text)
        lines = text.splitlines()
        for i, block in enumerate(blocks):
            includes = included_examples(block)
            if not includes or len(includes) != 1:
                continue
            j = i + 1
            if j + 1 < len(blocks) and blocks[j].lang in ("bash", "sh") and adjacent(lines, blocks[i], blocks[j]):
                j += 1
            if j < len(blocks) and is_output(blocks[j]) and adjacent(lines, blocks[j - 1], blocks[j]):
                shown.setdefault(includes[0], []).append((f"{page.name}:{blocks[j].first_line}", blocks[j]))
    return shown


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=page_id)
def test_example(example: Path) -> None:
    """The example runs with the command in its docstring, from an empty directory with only installed
    packages importable, and prints what every page that shows its output says it prints.

    The run is shared with the tests that check an example's numbers (tests/docs_examples.py)."""
    proc = run_example(example.name).proc
    assert proc.returncode == 0, f"{example.name} failed:\n{proc.stdout}\n{proc.stderr}"
    for where, block in shown_example_outputs().get(example.resolve(), []):
        assert output_matches(block.body, proc.stdout), (
            f"{where}: the Output block shown for {example.name} does not match.\n"
            f"Shown:\n{block.body}\nPrinted:\n{proc.stdout}"
        )


def test_every_example_is_shown_on_a_page() -> None:
    shown = "\n".join(p.read_text() for p in PAGES)
    for example in EXAMPLE_FILES:
        assert f"docs/examples/{example.name}" in shown, f"{example.name} is not included by any page"


def test_runner_skips_only_included_examples() -> None:
    def code(markdown: str) -> str | None:
        return runnable_code(parse_blocks(markdown)[0], "test")

    include = '--8<-- "docs/examples/ring_rotation.py"'
    assert code(f"<!-- no-run -->\n```python\n{include}\n```\n") is None
    assert code(f'```python title="ring_rotation.py"\n{include}\n```\n') is None
    assert "def rotate" in code(f"```python\n{include}\n```\n")  # unmarked: expanded, run
    assert code('```python title="x.py"\nx = 1\n```\n') == "x = 1\n"  # a title alone skips nothing
    for hidden in ("```python\nraise SystemExit\n```", '```python\n--8<-- "reference/ring.py"\n```'):
        with pytest.raises(ValueError, match="must run"):
            code(f"<!-- no-run -->\n{hidden}\n")


# Anything off the site that a browser would fetch: a script, stylesheet, image, font or frame.
TAG = re.compile(r"<(script|img|iframe|source|link)\b[^>]*>", re.I)
EXTERNAL_URL = re.compile(r"""\b(?:src|href)\s*=\s*["'](?:https?:)?//""", re.I)
CSS_EXTERNAL_URL = re.compile(r"""url\(\s*["']?(?:https?:)?//""", re.I)


def external_fetches(text: str) -> list[str]:
    """Tags and CSS urls in a built file that would make the browser leave the machine."""
    found = []
    for m in TAG.finditer(text):
        tag = m.group(0)
        is_link = m.group(1).lower() == "link"
        if is_link and re.search(r"""rel=["']?(canonical|alternate)""", tag, re.I):
            continue  # metadata, never fetched by the browser
        if EXTERNAL_URL.search(tag):
            found.append(tag[:160])
    found += [m.group(0) for m in CSS_EXTERNAL_URL.finditer(text)]
    return found


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of the project at ``root`` into ``site``, with its full log (no ``--quiet``:
    it would hide warnings from strict mode's counter)."""
    return work_limits.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", site],
        cpu_s=300,
        cwd=root,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # material's banner about MkDocs 2
    )


def build_problems(proc: subprocess.CompletedProcess) -> list[str]:
    """Why a build is not clean: a non-zero exit, or any WARNING or ERROR line in its log."""
    log = proc.stdout + proc.stderr
    problems = [ln for ln in log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", ln)]
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode}:\n{log[-3000:]}")
    return problems


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with ``mkdocs build --strict``; fails (not skips) without mkdocs, and on any warning."""
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]' (CI must build the site)")
    site = tmp_path_factory.mktemp("site")
    problems = build_problems(mkdocs_build(REPO, site))
    assert not problems, "mkdocs build --strict is not clean:\n" + "\n".join(problems)
    return site


def test_mkdocs_build_strict(built_site: Path) -> None:
    offenders = []
    for f in [*built_site.rglob("*.html"), *built_site.rglob("*.css")]:
        offenders += [f"{f.relative_to(built_site)}: {t}" for t in external_fetches(f.read_text(errors="replace"))]
    assert not offenders, "the site must render offline; external references:\n" + "\n".join(offenders)


API = "api.html"


def test_api_page_renders_examples_and_returns(built_site: Path) -> None:
    """Every ``Examples:`` section is highlighted doctest code, no ``Example:`` heading is left as prose,
    each ``Returns`` section is one item (one value described in prose, not fake items), no source
    listing is shown, and no Sphinx role (``:func:`x```) is left as text."""
    html = (built_site / API).read_text()
    examples = re.findall(r'doc-section-title">Examples:</span></p>\s*(<div class="highlight">.*?</div>)', html, re.S)
    assert len(examples) == html.count('doc-section-title">Examples:') >= 6, "an Examples section is not code"
    assert all('class="gp">&gt;&gt;&gt;' in block for block in examples), "an example is not a doctest block"
    # griffe reads "Example:" as an admonition, whose doctest lines run together as prose
    assert not re.search(r'class="admonition example"|<details class="example"|<p>Examples?::?\s', html), (
        "a docstring says 'Example:' or 'Example::' (Google style wants 'Examples:')"
    )
    returns = re.findall(r'doc-section-title">Returns:</span></p>\s*<ul>(.*?)</ul>', html, re.S)
    assert len(returns) == html.count('doc-section-title">Returns:') >= 30
    split = [r for r in returns if r.count('class="doc-section-item') != 1]
    assert not split, f"{len(split)} Returns sections split one description into several items:\n{split[0][:800]}"
    assert "Source code in" not in html, "the API page lists source code (mkdocs.yml: show_source: false)"
    roles = re.findall(r":(?:mod|func|class|meth|attr|data|exc|obj):<code>[^<]*", html)
    assert not roles, f"Sphinx roles left as text: {roles[:5]}"


# ``from cp_dtensor.positions.blocks import plan_blocks``, ``from reference import (a, b as c)``
IMPORT_FROM = re.compile(r"^[ \t]*from\s+((?:cp_dtensor|reference)[\w.]*)\s+import\s+(\([^)]*\)|[^\n]*)", re.M)


def imported_names(code: str) -> list[str]:
    """Import paths of the names a piece of code imports from ``cp_dtensor`` or ``reference``."""
    names = []
    for m in IMPORT_FROM.finditer(code):
        for item in re.sub(r"#[^\n]*", "", m[2]).strip("()").split(","):
            name = item.split(" as ")[0].strip(" \t\n\\")
            if name and name != "*":
                names.append(f"{m[1]}.{name}")
    return names


def names_the_course_imports() -> dict[str, list[str]]:
    """Import path -> the pages and docs/examples files that import it."""
    found: dict[str, list[str]] = {}
    for path in [*PAGES, *EXAMPLE_FILES]:
        for name in imported_names(path.read_text()):
            found.setdefault(name, []).append(path.name)
    return found


def test_the_import_scan_reads_the_forms_pages_use() -> None:
    """One-line, aliased, parenthesised and commented imports are all seen (or the next test would
    check nothing for them)."""
    code = (
        "from cp_dtensor.positions.blocks import plan_blocks as pb, block_pairs\n"
        "    from reference import (\n        shard,  # a comment, with a comma\n        unshard as u,\n    )\n"
        "import torch\nfrom torch import nn\n"
    )
    assert imported_names(code) == [
        "cp_dtensor.positions.blocks.plan_blocks",
        "cp_dtensor.positions.blocks.block_pairs",
        "reference.shard",
        "reference.unshard",
    ]
    assert "cp_dtensor.ring_attention" in names_the_course_imports()


def test_api_page_has_every_name_the_course_imports(tmp_path: Path) -> None:
    """Every name a page or docs/examples file imports from cp_dtensor or reference is documented on
    the API page under the path it is imported by, so a page can link it as [`name`][path].

    Checked the way pages use it: a copy of the project whose API page links every such path with
    mkdocs-autorefs must build with ``--strict`` (an unresolved link is a warning)."""
    found = names_the_course_imports()
    _copy_project(tmp_path)
    api = tmp_path / "docs" / "api.md"
    links = "\n".join(f"- [`{path}`][{path}]" for path in sorted(found))
    api.write_text(api.read_text() + "\n## Imported by the course\n\n" + links + "\n")
    proc = mkdocs_build(tmp_path, tmp_path / "site")
    log = proc.stdout + proc.stderr
    missing = sorted(path for path in found if f"'{path}'" in log or f"[{path}]" in log)
    assert not missing, "not on the API page (add a ::: line to docs/api.md):\n" + "\n".join(
        f"{path} (imported by {', '.join(sorted(set(found[path])))})" for path in missing
    )
    assert not build_problems(proc), "\n".join(build_problems(proc))


def _copy_project(dest: Path) -> None:
    """What ``mkdocs build`` reads (mkdocs.yml, docs/, and the packages the API page documents), copied."""
    import shutil

    shutil.copy(REPO / "mkdocs.yml", dest / "mkdocs.yml")
    for name in ("docs", "cp_dtensor", "reference"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))


def test_the_build_fails_on_a_broken_link_and_on_a_docstring_warning(tmp_path: Path) -> None:
    """Two copies of the project, one with a link to a missing page, one with a docstring griffe warns
    about; both builds (run side by side) must fail and name the fault."""
    link, doc = tmp_path / "link", tmp_path / "doc"
    for root in (link, doc):
        root.mkdir()
        _copy_project(root)
    page = link / "docs" / "index.md"
    page.write_text(page.read_text() + "\n[a broken link](no-such-page.md)\n")
    module = doc / "cp_dtensor" / "positions" / "layout.py"
    # an Args entry for a parameter the function does not have: griffe warns
    entry = r"\1Args:\n\1    no_such_argument: Documented but absent.\n"
    module.write_text(re.sub(r"(?m)^( *)Args:\n", entry, module.read_text(), count=1))
    builds = {
        name: work_limits.Job(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", root / "site"],
            cpu_s=300,
            cwd=root,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        )
        for name, root in (("link", link), ("doc", doc))
    }
    procs = work_limits.wait_all(builds)
    for name, expected in (("link", "no-such-page.md"), ("doc", "no_such_argument")):
        proc = procs[name]
        assert isinstance(proc, subprocess.CompletedProcess), f"{name}: {proc}"
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"{name}: the build passed despite the injected fault:\n{out[-2000:]}"
        assert any(expected in p for p in build_problems(proc)), f"{name}: the warning does not name {expected}:\n{out}"


def _check_site_module():
    sys.path.insert(0, str(DOCS / "scripts"))
    try:
        import check_site
    finally:
        sys.path.remove(str(DOCS / "scripts"))
    return check_site


@pytest.fixture(scope="module")
def chromium() -> str:
    """Chromium's path; skips where none is installed (the README's test command installs no browser)."""
    path = _check_site_module().find_chromium()
    if path is None:
        pytest.skip("no Chromium on PATH: install one (e.g. apt-get install chromium) to run the browser checks")
    return path


@pytest.fixture(scope="module")
def site_check(built_site: Path, chromium: str) -> dict[str, list[str]]:
    """Every built page opened once in headless Chromium at 1280 px: docs/scripts/check_site.py."""
    return _check_site_module().check_site(built_site, chromium)


def test_site_in_headless_browser(site_check: dict[str, list[str]]) -> None:
    """Math rendered, images shown, no request off the machine."""
    problems = site_check["render"] + site_check["offline"]
    assert not problems, "\n".join(problems)


def test_nothing_wider_than_its_box_at_1280px(site_check: dict[str, list[str]]) -> None:
    """No code block, table or display equation overflows its box or the text column, and no page
    is wider than a 1280 px window (what a laptop shows; code lines of <= 88 columns fit)."""
    assert not site_check["width"], f"{len(site_check['width'])} elements too wide:\n" + "\n".join(site_check["width"])


def _table(cells: int) -> str:
    table = "<table><tr>" + "<td>a_cell_of_text</td>" * cells + "</tr></table>"
    return f'<div class="md-typeset__scrollwrap"><div class="md-typeset__table">{table}</div></div>'


def _code(line: str) -> str:
    return f'<div class="highlight"><pre><span></span><code>{line}</code></pre></div>'


def _equation(terms: int) -> str:
    return '<div class="arithmatex">\\[' + " + ".join(f"x_{{{i}}}^2" for i in range(terms)) + "\\]</div>"


# Elements injected into a built page, as Material and KaTeX render them: id -> (HTML, too wide?)
INJECTED = {
    "wide-table": (_table(40), True),
    "wide-code": (_code("x = " + "1 + " * 40 + "1"), True),  # 165 columns
    "wide-equation": (_equation(80), True),
    "narrow-table": (_table(3), False),
    "narrow-code": (_code("y= " + "2 + " * 21 + "2"), False),  # 88 columns, the pages' limit
    "narrow-equation": (_equation(8), False),
}


def test_width_check_reports_wide_elements_and_only_those(built_site: Path, chromium: str, tmp_path: Path) -> None:
    """The width check can fail, and is not fooled: in a copy of the API page, a wide table, a
    165-column code line and a long equation are each reported; a small table, an 88-column code line
    and a short equation are not."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(built_site, site)
    page = site / API
    text = page.read_text()
    start = re.search(r"<article[^>]*>", text)
    injected = "".join(f'<h2 id="{name}">{name}</h2>{html}' for name, (html, _) in INJECTED.items())
    page.write_text(text[: start.end()] + injected + text[start.end() :])
    width = _check_site_module().check_site(site, chromium, pages=[API])["width"]
    reported = {name for name in INJECTED if any(f"(after #{name})" in line for line in width)}
    assert reported == {name for name, (_, wide) in INJECTED.items() if wide}, "\n".join(width)


def test_search_works_from_file_urls(built_site: Path, chromium: str) -> None:
    """Opened from disk (file://), the front page's search lists results (Material's offline plugin
    and the vendored iframe-worker shim)."""
    problems = _check_site_module().check_search_from_disk(built_site, chromium)
    assert not problems, "\n".join(problems)


def test_figures_regenerate(tmp_path: Path) -> None:
    """Every committed figure is remade by a script: make_figures.py and each docs/scripts/fig_*.py.

    The performance plots (``perf_*``, from ``python -m bench.report --figures``) and the memory plots
    (``figures/memory/``) are remade from their JSON results by their own tests.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.fail("matplotlib is not installed: pip install -e '.[docs]'")
    scripts = [DOCS / "scripts" / "make_figures.py", *sorted((DOCS / "scripts").glob("fig_*.py"))]
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO)}
    # side by side, each a fork of the preloaded server (tests/warm_launch.py): each would import torch
    jobs = {
        script.name: warm_launch.WarmJob([sys.executable, script, "--out", tmp_path], cpu_s=300, cwd=REPO, env=env)
        for script in scripts
    }
    for name, proc in work_limits.wait_all(jobs).items():
        assert isinstance(proc, subprocess.CompletedProcess) and proc.returncode == 0, f"{name}: {proc}"
    made = {p.name for p in tmp_path.glob("*") if p.suffix in (".png", ".gif")}  # a .gif: an animated figure
    committed = {p.name for p in FIGURES.glob("*") if p.suffix in (".png", ".gif") and not p.name.startswith("perf_")}
    assert made == committed, f"figures made {sorted(made)} != committed {sorted(committed)}"
