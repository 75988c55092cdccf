"""Moved to :mod:`cp_dtensor.parallel.grad_sync`; this alias goes in the next release."""

from cp_dtensor._moved import alias

alias(__name__)
