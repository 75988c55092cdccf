"""Moved to :mod:`cp_dtensor.parallel.tensor_parallel`; this alias goes in the next release."""

from cp_dtensor._moved import alias

alias(__name__)
