"""``python -m trioagg`` is the ``trioagg`` command."""

from .cli import main

main()
