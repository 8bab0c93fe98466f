"""`python -m avengers.recall`: the associative-recall sweep (avengers/quality/recall.py, docs/quality.md)."""

import sys

from avengers.quality.recall import main

if __name__ == "__main__":
    sys.exit(main())
