"""Stigmer local mode."""

__version__ = "0.1.0"
