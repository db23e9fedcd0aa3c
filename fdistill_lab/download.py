"""``python -m fdistill_lab.download``: the command of :mod:`fdistill_lab.train.download`."""

from .train.download import main

if __name__ == "__main__":
    raise SystemExit(main())
