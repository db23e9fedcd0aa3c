"""Course tooling: notebook set-up and parameter checks, results records, exercise checks with reference
solutions, student copies and executed handouts. Builds on the labs; nothing below imports it."""

from .notebook import setup_notebook
from .records import read_records, record

__all__ = ["read_records", "record", "setup_notebook"]
