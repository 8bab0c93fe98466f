"""`python -m avengers.train [--config FILE] [--field=value ...]`, alone or under torchrun."""

import sys

import torch.distributed as dist

from avengers.config import ConfigError, config_from_argv


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"avengers.train: error: {e}", file=sys.stderr)
        return 2
    from avengers.train.trainer import train

    try:
        train(cfg)
    except ConfigError as e:
        print(f"avengers.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
