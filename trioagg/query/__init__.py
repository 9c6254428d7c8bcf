"""Queries: the parameters (``params``), what a query may cost (``budget``), the
aggregates' plan and merge (``aggregates``), keys and top (``discovery``), and the
answers kept hot in memory (``readcache``). None of them reads the store: the use
cases in :mod:`trioagg.service.lifecycle.cases` do, in worker threads."""
