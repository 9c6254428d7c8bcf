"""What browsers get: the dashboard page and its files.

The page (``GET /``) and its JavaScript, CSS and the vendored chart library are
files of the package (``trioagg/http/web/``), read once when the app is made and
served from memory. The page is revalidated on every load (``no-cache`` with an
ETag); the files it loads live under ``/static/<digest>/``, where the digest is
of every file's name and bytes, so they are cached for good (``immutable``) and
a new version of trioagg is a new address. The page reads only the public API,
plus ``GET /v1/status``: the figures of ``/metrics`` that a glance needs.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from quart import Response, request
from werkzeug.exceptions import NotFound

if TYPE_CHECKING:
    from .app import TrioaggApp, View

_INDEX = "index.html"
#: Replaced in the page by the address of this version's files.
_STATIC_MARK = b"{{static}}"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", "": "text/plain"}
#: The page talks to its own origin only; nothing inline, nothing from elsewhere.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_IMMUTABLE = "public, max-age=31536000, immutable"


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def of(cls, name: str, body: bytes) -> _File:
        return cls(body, _content_type(name), hashlib.sha256(body).hexdigest()[:32])


class StaticFiles:
    """The page and the files under ``trioagg/http/web/``, in memory, with their digest. (Not
    ``trioagg/static/``: Quart would serve a folder of that name by itself, uncached.)"""

    def __init__(self) -> None:
        found = dict(sorted(_walk(resources.files("trioagg.http") / "web", "")))
        digest = hashlib.sha256()
        for name, body in found.items():
            digest.update(name.encode() + b"\0" + hashlib.sha256(body).digest())
        #: Where this version's files are served, relative to the page.
        self.prefix = f"static/{digest.hexdigest()[:16]}"
        page = found.pop(_INDEX).replace(_STATIC_MARK, self.prefix.encode())
        self.page = _File.of(_INDEX, page)
        self.files = {name: _File.of(name, body) for name, body in found.items()}


def _walk(folder: Traversable, path: str) -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = []
    for entry in folder.iterdir():
        name = f"{path}{entry.name}"
        if entry.is_dir():
            found.extend(_walk(entry, name + "/"))
        elif not entry.name.startswith("."):
            found.append((name, entry.read_bytes()))
    return found


def _content_type(name: str) -> str:
    suffix = PurePosixPath(name).suffix
    kind = _TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return f"{kind}; charset=utf-8" if kind.startswith("text/") else kind


async def _conditional(file: _File, cache_control: str) -> Response:
    response = Response(file.body, 200, content_type=file.content_type)
    response.headers["Cache-Control"] = cache_control
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.set_etag(file.etag)
    return await response.make_conditional(request)


def dashboard_views(app: TrioaggApp) -> dict[str, View]:
    """The views of the page at ``/`` and its files, by name."""
    static = StaticFiles()

    async def page() -> Response:
        response = await _conditional(static.page, "no-cache")
        response.headers["Content-Security-Policy"] = _PAGE_POLICY
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    async def dashboard_file(version: str, name: str) -> Response:
        file = static.files.get(name)
        if file is None or f"static/{version}" != static.prefix:
            raise NotFound(f"no such file: {request.path[:300]}")
        return await _conditional(file, _IMMUTABLE)

    return {"page": page, "dashboard_file": dashboard_file}
