"""An event as every part of trioagg after the edge sees it, and the limits of one.

The HTTP decoder (:mod:`~trioagg.ingest.decode`), the StatsD and OTLP receivers make
:data:`Point` values; the writers, the journal, the planner and the store take
them. The tenant tag and the tag limits live here too, beside the event they
bound, so that none of those parts imports a body decoder. Imports nothing of
trioagg.
"""

from __future__ import annotations

from typing import Final

#: One validated event: (key, ts in Unix seconds, value, canonical tags JSON,
#: distinct_id or None, idempotency id or None). A plain tuple with named positions,
#: not a NamedTuple: CPython 3.11 indexes and unpacks exact tuples only on its fast
#: paths. Measured with callgrind (gc off, 1,000-event batches), a NamedTuple cost
#: 5,733 instructions per event against 4,872 to fold a batch over 10 keys into the
#: head (+18%), and ~1,000 more per event to build in the decoder (+8%). Code that
#: reads one field names its position: ``point[TS]``.
Point = tuple[str, float, float, str, str | None, str | None]
KEY: Final = 0
TS: Final = 1
VALUE: Final = 2
TAGS: Final = 3
DISTINCT_ID: Final = 4
ID: Final = 5

NO_TAGS: Final = "{}"
#: The tag a tenant's API key stamps on what it sends and filters what it reads by.
TENANT_TAG: Final = "tenant"

#: The largest magnitude of an event's value. Squares of values (the spread's
#: moments) summed over any realistic count of events stay finite: 1e100 ** 2
#: * 1e18 events ~ 1e218, far below float's 1.8e308.
MAX_ABS_VALUE: Final = 1e100
#: The most tags of an event, and so of a series (a tenant's stamped tag included).
MAX_TAGS: Final = 16
#: The most UTF-8 bytes of a tag's value.
TAG_VALUE_BYTES: Final = 255
#: The most UTF-8 bytes of an event's tags together, as stored (compact JSON, names
#: sorted, a tenant's stamped tag included). Every store can index a series by its key
#: and tags then: PostgreSQL refuses an index entry over 2,704 bytes (its key, bucket
#: and tags; the key is at most 255 bytes), and 16 tags of 255-byte values would make
#: one of over 4 KB, failing at commit what validation had accepted.
TAGS_BYTES: Final = 2048
