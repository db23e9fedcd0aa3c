"""``python -m fdistill_lab.t2i``: train (one process or under torchrun), COCO reference statistics, evaluation."""

from .cli import main

raise SystemExit(main())
