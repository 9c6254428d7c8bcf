"""``just bench``: the stress harness of trioagg. See ``python -m bench --help``."""
