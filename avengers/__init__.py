"""Constant-cache language-model workshop: one trainer, one data pipeline, many model families."""

__version__ = "0.1.0"
