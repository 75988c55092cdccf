"""The package a user installs: the wheel, installed (not editable) into a fresh environment, works alone.

* ``test_torch_version_*``: ``import cp_dtensor`` refuses a torch older than the tested one, naming it;
  ``test_torch_floor_is_one_number``: pyproject.toml, README.md and the check agree on that floor.
* ``test_wheel_*``: the wheel built from this tree has one top-level name, ``cp_dtensor`` (the oracle
  as ``cp_dtensor.reference``), every package folder of the tree, the ``py.typed`` marker and the
  license.
* ``test_installed_*``: the wheel is ``pip install``-ed into a fresh venv, which sees torch (and its
  dependencies) through a ``.pth`` line naming this environment's site-packages, and nothing of the
  repository. A path line of a ``.pth`` file adds the folder without running the ``.pth`` files in
  it, so this environment's editable install stays off: ``import cp_dtensor`` finds the wheel's copy,
  and the first test asserts it. Each command then runs with the venv's python from an empty folder:
  the import, ring attention on 2 gloo ranks forward and backward (``tests/smoke_installed.py``),
  ``cp-dtensor --help``, and one docs page through the page runner of ``tests/test_docs.py``.
* ``test_changelog_starts_with_this_version``: CHANGELOG.md's newest entry is pyproject's version.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import work_limits

from cp_dtensor._torch_version import MIN_TORCH, check_torch_version

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tests" / "smoke_installed.py"
DOCS_PAGE = REPO / "docs" / "ring.md"  # seconds to run; imports the oracle, cp_dtensor.reference
# Not copied to the build: what .gitignore ignores (a stale build/lib would leak removed modules
# into the wheel) and the git directory.
NOT_SOURCE = (".git", ".venv", "build", "dist", "site", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")


@pytest.mark.parametrize("version", ["2.13.0", "2.13.0+cpu", "2.13.0a0+git1234", "2.14.1", "3.0.0"])
def test_torch_version_at_or_above_the_floor_passes(version: str) -> None:
    check_torch_version(version)


@pytest.mark.parametrize("version", ["2.5.1", "2.12.1+cu121", "1.13.1", "nightly"])
def test_torch_version_below_the_floor_names_the_needed_one(version: str) -> None:
    with pytest.raises(ImportError, match=re.escape(f"cp_dtensor needs torch >= 2.13 (found {version})")):
        check_torch_version(version)


def test_torch_version_is_checked_at_import() -> None:
    """``import cp_dtensor`` under an old torch raises the ImportError, before any other module runs."""
    code = "import torch; torch.__version__ = '2.5.1'; import cp_dtensor"
    proc = work_limits.run([sys.executable, "-c", code], cpu_s=60)
    assert proc.returncode != 0
    assert "ImportError: cp_dtensor needs torch >= 2.13 (found 2.5.1)" in proc.stderr, proc.stderr


def test_torch_floor_is_one_number() -> None:
    """The floor the import checks is the one pyproject.toml requires and README.md states."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    floor = ".".join(map(str, MIN_TORCH))
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch>={floor}" in dependencies
    assert f"needs torch >= {floor}" in (REPO / "README.md").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel .`` builds from a clean copy of this tree, with this venv's setuptools (no
    download: torch 2.13 requires setuptools >= 77.0.3, what pyproject's build-system asks for)."""
    src, out = tmp_path_factory.mktemp("src") / "cp_dtensor", tmp_path_factory.mktemp("dist")
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    proc = work_limits.run(cmd, cpu_s=300)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (path,) = out.glob("*.whl")
    return path


def source_packages() -> set[str]:
    """Every package folder of the tree, by its installed name: ``cp_dtensor.*`` and ``reference``."""
    names = set()
    for top, installed_as in (("cp_dtensor", "cp_dtensor"), ("reference", "cp_dtensor/reference")):
        for init in (REPO / top).rglob("__init__.py"):
            names.add(str(Path(installed_as) / init.parent.relative_to(REPO / top)).removesuffix("/."))
    return names


def test_wheel_has_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"cp_dtensor", wheel.name.split("-py")[0] + ".dist-info"}, sorted(tops)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["cp_dtensor"]


def test_wheel_ships_every_package_the_typing_marker_and_the_license(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.removesuffix("/__init__.py") for name in names if name.endswith("/__init__.py")}
    assert packages == source_packages(), "pyproject.toml's packages list and the folders differ"
    assert "cp_dtensor/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed and torch seen through a ``.pth`` line; its folder."""
    root = tmp_path_factory.mktemp("venv")
    assert work_limits.run([sys.executable, "-m", "venv", "--without-pip", str(root)], cpu_s=60).returncode == 0
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The folder pip put torch in, with its dependencies (numpy, sympy, ...); it is not processed
    # as a site dir, so its .pth files (this repository's editable install) do not run.
    (Path(purelib) / "torch_of_the_test_env.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index"]
    proc = work_limits.run([*install, str(wheel)], cpu_s=300)
    assert proc.returncode == 0, f"pip install of the wheel failed:\n{proc.stdout}\n{proc.stderr}"
    return root


def run_installed(argv: list[str], cwd: Path, cpu_s: float = 120) -> str:
    """Run ``argv`` in ``cwd`` (an empty folder) with no ``PYTHONPATH``; its output, or a failed test.

    ``cpu_s``: the run's work limit (tests/work_limits.py), not wall time, which a busy machine stretches.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = work_limits.run([str(a) for a in argv], cpu_s=cpu_s, cwd=cwd, env=env)
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_installed_package_is_the_wheel_not_the_tree(wheel: Path, venv: Path, tmp_path: Path) -> None:
    code = (
        "import importlib.metadata, cp_dtensor, cp_dtensor.reference, cp_dtensor.training\n"
        "print(cp_dtensor.__file__, cp_dtensor.reference.__file__, importlib.metadata.version('cp-dtensor'))"
    )
    *files, version = run_installed([venv / "bin" / "python", "-c", code], tmp_path).split()
    for file in files:
        assert Path(file).is_relative_to(venv), f"{file} is not the installed wheel's (under {venv})"
    assert wheel.name.startswith(f"cp_dtensor-{version}-")


def test_installed_ring_attention_on_two_ranks(venv: Path, tmp_path: Path) -> None:
    script = shutil.copy(SMOKE, tmp_path)  # run from the empty folder: sys.path[0] holds only the script
    assert "matches one process" in run_installed([venv / "bin" / "python", script], tmp_path)


def test_installed_cli_help(venv: Path, tmp_path: Path) -> None:
    assert "estimate" in run_installed([venv / "bin" / "cp-dtensor", "--help"], tmp_path)


def test_installed_docs_page_runs(venv: Path, tmp_path: Path) -> None:
    from test_docs import page_problems

    problems = page_problems(DOCS_PAGE, tmp_path, python=str(venv / "bin" / "python"))
    assert not problems, "\n\n".join(problems)


def test_changelog_starts_with_this_version() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    (first,) = re.findall(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.M)[:1]
    assert first == version, f"CHANGELOG.md starts with {first}, pyproject.toml says {version}"
