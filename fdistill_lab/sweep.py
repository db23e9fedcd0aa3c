"""``python -m fdistill_lab.sweep``: the command of :mod:`fdistill_lab.toy.grid`."""

from .toy.grid import main

if __name__ == "__main__":
    raise SystemExit(main())
