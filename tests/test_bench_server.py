"""The bench's servers started for real, the way the harness starts them
(``bench.server``), over loopback.

The deployment's pure rules (commands, flags) are tested in ``test_bench.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.server import Server, ServerError

#: One worker of two: it says it runs, and answers every request 200.
ONE_OF_TWO = """
import socket
listener = socket.create_server(("127.0.0.1", 0))
print(f"Running on http://127.0.0.1:{listener.getsockname()[1]} (1 of 2)", flush=True)
while True:
    conn, _ = listener.accept()
    with conn:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-length: 0\\r\\n\\r\\n")
"""


def test_a_server_has_started_only_once_every_worker_runs(tmp_path: Path) -> None:
    """Load must not start on one worker of two (nor RSS and CPU miss the other)."""
    server = Server("fake", [sys.executable, "-c", ONE_OF_TWO], {}, tmp_path / "a.log", workers=2)
    with pytest.raises(ServerError, match="did not start"):
        server.start(timeout=1.0)
    assert server.process is not None and server.process.poll() is not None
    alone = Server("fake", [sys.executable, "-c", ONE_OF_TWO], {}, tmp_path / "b.log", workers=1)
    alone.start()
    alone.kill()
    assert alone.port > 0
