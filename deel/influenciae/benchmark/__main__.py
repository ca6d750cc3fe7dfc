"""``python -m deel.influenciae.benchmark``: see :mod:`deel.influenciae.benchmark.cli`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
