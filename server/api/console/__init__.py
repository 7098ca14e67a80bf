"""The web console (docs/console.md): the phone farm at a glance, a playground, the last requests.

Plain HTML, CSS and JavaScript in ``static/`` (shipped in the package: no CDN, no network, no build
step), served at ``/`` and ``/console`` (the page) and ``/console/<file>`` (its assets), unless
``Settings.console`` is off. The page and its assets are open (they hold no data); everything the
console shows it reads from the public API with the user's key (``/v1/models``, ``/v1/devices/events``,
``/v1/requests``, ``/v1/chat/completions``, ``/v1/completions``).

The responses forbid what the console never needs (Content-Security-Policy: scripts and styles from
this server only, no inline script, no frames): a second line of defence behind the rule that model
output is only ever put in the page as text.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.exceptions import HTTPException

STATIC = resources.files(__package__) / "static"
PAGE = "index.html"
TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# the page and every asset, fixed when the module loads: nothing else under /console is served
ASSETS = sorted(f.name for f in STATIC.iterdir() if f.name.endswith(tuple(TYPES)) and f.name != PAGE)
PATHS = frozenset({"/", "/console", *(f"/console/{name}" for name in ASSETS)})

router = APIRouter(include_in_schema=False)


def _file(name: str) -> Response:
    suffix = name[name.rfind("."):]
    return Response((STATIC / name).read_bytes(), media_type=TYPES[suffix], headers=HEADERS)


@router.get("/")
@router.get("/console")
async def page() -> Response:
    return _file(PAGE)


@router.get("/console/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, "Not Found")  # as any unknown path
    return _file(name)
