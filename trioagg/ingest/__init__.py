"""Ingest: events in, from an HTTP body (``decode``), OTLP (``otlp``) or StatsD
(``statsd``), to the writers (``writer``) that journal each batch, fold it into
their heads and flush the heads to the store."""
