"""Moved to :mod:`cp_dtensor.training.model`; this alias goes in the next release."""

from cp_dtensor._moved import alias

alias(__name__)
