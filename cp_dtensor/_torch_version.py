"""The torch this package needs, checked first thing at ``import cp_dtensor``.

The floor is the lowest torch the tests run against (CI tests torch 2.13 only). An older torch
fails here, with the version to install, rather than later with an ``AttributeError`` deep inside
``torch.distributed``.
"""

from __future__ import annotations

import re

import torch

__all__ = ["MIN_TORCH", "check_torch_version"]

MIN_TORCH = (2, 13)
"""The lowest ``(major, minor)`` of torch that ``cp_dtensor`` is tested with, and so supports."""


def check_torch_version(version: str) -> None:
    """Raise if ``version`` (a ``torch.__version__``) is older than :data:`MIN_TORCH`.

    Local and pre-release tags count as their release: ``2.13.0+cpu`` and ``2.13.0a0+git1234`` pass.

    Args:
        version: A torch version string, e.g. ``"2.13.0+cpu"``.

    Raises:
        ImportError: ``version`` is older than :data:`MIN_TORCH`, or has no ``major.minor`` to read.
    """
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match is None or (int(match[1]), int(match[2])) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(
            f"cp_dtensor needs torch >= {need} (found {version}), the lowest version it is tested with; "
            f"install a newer torch (pip install 'torch>={need}')."
        )


check_torch_version(torch.__version__)
