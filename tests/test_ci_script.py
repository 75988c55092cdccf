"""CI runs the README's test command and nothing else (``.ci/run``), so one install serves both.

* ``test_ci_runs_the_readme_test_command``: the command ``.ci/run`` extracts is the second bash block
  of the README's "Two commands for a fresh machine", found here independently of the script's marker.
* ``test_ci_installs_nothing_of_its_own``: no line of ``.ci/run`` (comments aside) installs, creates
  an environment or runs a check itself.
* ``test_ci_runs_the_command_and_exits_with_its_status``: with a stand-in README, ``.ci/run`` runs its
  command, prints what it printed, and exits with its status.
* ``test_readme_test_command_installs_extras_that_exist``: the extras it names are in pyproject.toml.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CI = REPO / ".ci" / "run"
README = REPO / "README.md"


def two_commands() -> list[str]:
    """The first two bash blocks of the README's section "Two commands for a fresh machine"."""
    section = README.read_text().split("## Two commands for a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)][:2]


def ci_print(root: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", root / ".ci" / "run", "--print"], capture_output=True, text=True, timeout=30)


def test_ci_runs_the_readme_test_command() -> None:
    job, tests = two_commands()
    assert "torchrun" in job and "pytest" in tests
    proc = ci_print()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == tests


def test_ci_installs_nothing_of_its_own() -> None:
    code = [line for line in CI.read_text().splitlines() if not line.lstrip().startswith("#")]
    own = re.compile(r"\b(pip|apt|apt-get|install|venv|conda|uv|curl|wget|pytest|ruff|python3?)\b")
    offending = [line for line in code if own.search(line)]
    assert not offending, f".ci/run must run only the README's command, but also does: {offending}"
    assert 'bash -e -c "$cmd"' in CI.read_text()


@pytest.mark.parametrize("status", [0, 3])
def test_ci_runs_the_command_and_exits_with_its_status(tmp_path: Path, status: int) -> None:
    (tmp_path / ".ci").mkdir()
    shutil.copy(CI, tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text(
        f"## Two commands\n\n<!-- .ci/run: the test command -->\n```bash\necho ran in $PWD && exit {status}\n```\n"
    )
    proc = subprocess.run(["bash", tmp_path / ".ci" / "run"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == status
    assert f"ran in {tmp_path}" in proc.stdout  # from the repository root, whatever the caller's folder


def test_ci_fails_without_the_marker(tmp_path: Path) -> None:
    (tmp_path / ".ci").mkdir()
    shutil.copy(CI, tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text("```bash\necho not marked\n```\n")
    proc = ci_print(tmp_path)
    assert proc.returncode != 0 and "no bash block after" in proc.stderr


def test_readme_test_command_installs_extras_that_exist() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (named,) = re.findall(r'pip install -e "\.\[([\w,]+)\]"', two_commands()[1])
    assert set(named.split(",")) <= set(extras), f"{named} vs {sorted(extras)}"
