"""`python -m avengers.bench`: the inference benchmark (see avengers/inference/bench.py)."""

import sys

from avengers.inference.bench import main

if __name__ == "__main__":
    sys.exit(main())
