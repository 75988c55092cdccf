"""Module paths that moved, kept importable for one release.

Each old path (``cp_dtensor.model``, ``cp_dtensor.grad_sync``, ...) is a two-line module that calls
:func:`alias`: importing it warns once and yields the moved module itself (the same object, so
``isinstance`` checks, patches and pickles agree). The aliases go in the next release.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

MOVED = {
    "cp_dtensor.model": "cp_dtensor.training.model",
    "cp_dtensor.data": "cp_dtensor.training.data",
    "cp_dtensor.train": "cp_dtensor.training.train",
    "cp_dtensor.checkpoint": "cp_dtensor.parallel.checkpoint",
    "cp_dtensor.grad_sync": "cp_dtensor.parallel.grad_sync",
    "cp_dtensor.tensor_parallel": "cp_dtensor.parallel.tensor_parallel",
}
"""Old module path -> new module path."""


def alias(old: str) -> types.ModuleType:
    """Warn that ``old`` moved, and make ``import old`` return the module at its new path.

    Args:
        old: A key of :data:`MOVED`.

    Returns:
        The moved module, also installed as ``sys.modules[old]``.
    """
    new = MOVED[old]
    warnings.warn(
        f"{old} moved to {new}; import it from there (the old path goes in the next release).",
        DeprecationWarning,
        stacklevel=3,
    )
    module = importlib.import_module(new)
    sys.modules[old] = module  # the import system returns what sys.modules holds after the alias ran
    return module
