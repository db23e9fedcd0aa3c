"""``python -m fdistill_lab.student``: the command of :mod:`fdistill_lab.course.student_copies`."""

from .course.student_copies import main

if __name__ == "__main__":
    raise SystemExit(main())
