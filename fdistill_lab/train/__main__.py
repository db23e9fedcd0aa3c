"""``python -m fdistill_lab.train``: see :mod:`fdistill_lab.train.cli`."""

from .cli import main

raise SystemExit(main())
