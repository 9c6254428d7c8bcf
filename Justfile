# trioagg tasks. `pip install -e '.[dev]'` provides `just` (rust-just) and the tools below.

# Start the service on the embedded SQLite store (flags pass through: just serve --port 9000)
serve *ARGS:
    trioagg serve {{ARGS}}

# Run the whole test suite (the command .ci/run and the README use)
test *ARGS:
    python -m pytest {{ARGS}}

# The inner loop: the suite less its slow tests (processes, soak, browser, bench peers, waits
# of seconds); --store sqlite leaves out PostgreSQL and the sharded store too
test-fast *ARGS:
    python -m pytest -m "not slow" {{ARGS}}

# ruff, mypy, and the import layers (no module imports one above it)
lint:
    ruff check .
    ruff format --check trioagg tests bench tools
    mypy
    lint-imports

# The stress harness: just bench, just bench --quick, just bench --scenario seed
bench *ARGS:
    python -m bench {{ARGS}}

# A dashboard screenshot in headless chromium to build/dashboard.png (git ignores it); --out docs/dashboard.png for the docs' Quick start
screenshot *ARGS:
    python tools/screenshot.py {{ARGS}}

# The documentation site (docs/, nav in mkdocs.yml) into site/; a broken link fails it
docs *ARGS:
    mkdocs build --strict {{ARGS}}
