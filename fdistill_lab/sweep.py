"""``python -m fdistill_lab.sweep``: the command of :mod:`fdistill_lab.course.sweep`."""

from .course.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
