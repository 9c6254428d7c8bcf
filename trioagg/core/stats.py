"""The names of the statistics an answer can hold: :data:`STATS`, and the
percentiles ``pNN``. No I/O; imports nothing of trioagg.

The aggregation math (:mod:`~trioagg.core.rollup`), the query parser
(:mod:`~trioagg.query.params`) and the client's typed answers
(:mod:`~trioagg.client.answers`) all name stats; they take the names from here,
so that the client does not load the sketch library the math needs.
"""

from __future__ import annotations

import re

#: The statistics a rollup answers, in the order the API lists them (plus ``pNN``).
STATS = ("count", "sum", "min", "max", "avg", "stddev", "distinct", "last")

_PERCENTILE = re.compile(r"^p(100|\d{1,2}(\.\d+)?)$")


def is_percentile(name: str) -> bool:
    """``p50``, ``p99``, ``p99.9``: a percentile from 0 to 100."""
    return _PERCENTILE.match(name) is not None


def percentile_rank(name: str) -> float:
    """The rank of the percentile ``name`` (``p99`` -> 0.99); ``name`` is one."""
    return float(name[1:]) / 100.0
