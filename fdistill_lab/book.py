"""``python -m fdistill_lab.book``: the command of :mod:`fdistill_lab.course.book`."""

from .course.book import main

if __name__ == "__main__":
    raise SystemExit(main())
