"""Training: `python -m avengers.train --config FILE --flag=value ...` (see docs/training.md)."""

from avengers.train.trainer import train

__all__ = ["train"]
