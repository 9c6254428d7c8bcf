"""The service and its life: what outlives a request (``lifecycle``: the store, the
writers, the read cache, the key check, the StatsD receiver, from start to drain),
the request's use cases over it (``cases``, no web framework), and how it reports
on itself (``metrics``, ``loopwatch``, ``memory``)."""
