"""Moved to :mod:`cp_dtensor.parallel.checkpoint`; this alias goes in the next release."""

from cp_dtensor._moved import alias

alias(__name__)
