"""``python -m fdistill_lab.student``: the command of :mod:`fdistill_lab.course.student`."""

from .course.student import main

if __name__ == "__main__":
    raise SystemExit(main())
