"""`python -m avengers.train [--config FILE] [--field=value ...]`, alone or under torchrun."""

import sys

import torch.distributed as dist

from avengers.config import ConfigError, config_from_argv


def usage() -> str:
    from avengers.config import FIELDS

    lines = [
        "usage: python -m avengers.train [--config FILE.yaml] [--field=value ...]",
        "fields (defaults; 'None' = unset; details in docs/training.md):",
    ]
    lines += [f"  --{name}={field.default!r}" for name, field in FIELDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    try:
        cfg = config_from_argv(argv)
    except ConfigError as e:
        print(f"avengers.train: error: {e}", file=sys.stderr)
        return 2
    from avengers.train.checkpoint import CheckpointError
    from avengers.train.nonfinite import NonFiniteError
    from avengers.train.trainer import train

    try:
        train(cfg)
    except ConfigError as e:
        print(f"avengers.train: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointError) as e:
        print(f"avengers.train: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
