"""``python -m fdistill_lab.handouts``: the command of :mod:`fdistill_lab.course.handouts`."""

from .course.handouts import main

if __name__ == "__main__":
    raise SystemExit(main())
