"""The HTTP client of the daemon: transport choice, errors, auto-start.

```text
Sandbox / BaseHypervisor -> DaemonClient.request --(httpx, UDS | TCP + bearer)--> nova serve
                         -> DaemonClient.websocket --(websockets, UDS | TCP)--> .../exec/stream
  connect refused on the default socket -> _autostart.start_daemon -> retry once
  4xx/5xx problem+json -> errors.error_from_problem -> typed NovaError
```

Where the daemon is:

- ``NOVA_URL`` (``http://127.0.0.1:7070``) with ``NOVA_TOKEN`` (else the token
  in ``$NOVA_HOME/token`` when readable): TCP with a bearer token, never
  auto-started;
- else the Unix socket ``$NOVA_HOME/nova.sock`` (no token). When nothing
  answers there, the SDK starts ``nova serve`` itself (see
  :mod:`novasandbox._autostart`), unless ``NOVA_AUTOSTART=0``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect, unix_connect

from novasandbox import _autostart
from novasandbox._home import TOKEN_FILE, default_socket, nova_home
from novasandbox._version import __version__
from novasandbox.errors import DaemonUnavailable, NovaError, error_from_response

__all__ = ["DaemonClient"]

# Creates wait for a boot (and a queue), commands run as long as they run:
# no read timeout by default; the daemon bounds its own waits.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=120.0, pool=None)
USER_AGENT = f"novasandbox-python/{__version__}"
# Largest WebSocket message accepted (output frames are chunks, far smaller).
WS_MAX_MESSAGE = 64 * 1024 * 1024


class DaemonClient:
    """One connection pool to one daemon. Cheap to keep, closed with
    :meth:`aclose` (or ``async with``)."""

    def __init__(
        self,
        *,
        url: str | None = None,
        token: str | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        autostart: bool | None = None,
        timeout: httpx.Timeout | float | None = None,
    ) -> None:
        """Without arguments: ``NOVA_URL`` / ``NOVA_TOKEN`` when set, else the
        default socket with auto-start. ``autostart`` applies only to the
        default socket; ``NOVA_AUTOSTART=0`` turns it off."""
        env_url = os.environ.get("NOVA_URL") or None
        self.url: str | None = url or (env_url if socket_path is None else None)
        self.token: str | None = token
        self.socket_path: Path | None = None
        if self.url is None:
            self.socket_path = Path(socket_path) if socket_path is not None else default_socket()
        is_default_socket = self.url is None and socket_path is None
        env_autostart = os.environ.get("NOVA_AUTOSTART", "1") not in ("0", "false", "no")
        if autostart is None:
            autostart = env_autostart
        self.autostart = bool(autostart and is_default_socket)
        if self.url is not None and self.token is None:
            self.token = os.environ.get("NOVA_TOKEN") or _read_token()
        self._timeout = timeout if timeout is not None else DEFAULT_TIMEOUT
        self._http: httpx.AsyncClient | None = None
        self._start_lock: asyncio.Lock | None = None
        self._autostart_tried = False
        #: The pid of the daemon this client started, if it did.
        self.started_daemon_pid: int | None = None

    # -- plumbing ---------------------------------------------------------

    @property
    def where(self) -> str:
        """The daemon's address, for messages."""
        return self.url if self.url is not None else f"unix:{self.socket_path}"

    def _headers(self) -> dict[str, str]:
        headers = {"user-agent": USER_AGENT}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        return headers

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            if self.url is not None:
                self._http = httpx.AsyncClient(
                    base_url=self.url.rstrip("/"), headers=self._headers(), timeout=self._timeout
                )
            else:
                transport = httpx.AsyncHTTPTransport(uds=str(self.socket_path))
                self._http = httpx.AsyncClient(
                    base_url="http://nova",
                    transport=transport,
                    headers=self._headers(),
                    timeout=self._timeout,
                    trust_env=False,
                )
        return self._http

    async def aclose(self) -> None:
        """Closes the connection pool."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _unavailable(self, cause: BaseException) -> DaemonUnavailable:
        if self.url is not None:
            hint = "start it with `nova serve --listen ADDR:PORT`, or unset NOVA_URL"
        else:
            hint = "start it with `nova serve` (or let the SDK: NOVA_BIN or nova on PATH)"
        return DaemonUnavailable(f"no NovaSandbox daemon answers on {self.where} ({cause}); {hint}")

    async def _ensure_started(self) -> None:
        """Starts a daemon on the default socket, once per client; callers
        that lost the race wait for the first one's start."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._autostart_tried:
                return
            self._autostart_tried = True
            assert self.socket_path is not None
            self.started_daemon_pid = await _autostart.start_daemon(nova_home(), self.socket_path)

    # -- requests ---------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int | bool] | None = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Sends one request; a 4xx/5xx answer raises its typed error, no
        answer raises :class:`DaemonUnavailable` (after auto-starting the
        daemon once, where allowed)."""
        query = _query(params)
        try:
            response = await self._client().request(
                method, path, json=json, params=query, content=content, headers=headers
            )
        except (httpx.ConnectError, httpx.RemoteProtocolError) as e:
            # A refused connection never reached the daemon: safe to retry
            # once it runs. A streamed body cannot be sent twice.
            if not (self.autostart and _replayable(content)):
                raise self._unavailable(e) from e
            await self._ensure_started()
            try:
                response = await self._client().request(
                    method, path, json=json, params=query, content=content, headers=headers
                )
            except httpx.TransportError as e2:
                raise self._unavailable(e2) from e2
        except httpx.TransportError as e:
            raise self._unavailable(e) from e
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content)
        return response

    async def get_json(self, route: str, /, **params: str | int | bool) -> Any:
        """``GET route`` as JSON."""
        return (await self.request("GET", route, params=params)).json()

    async def post_json(self, route: str, body: Any = None, /, **params: str | int | bool) -> Any:
        """``POST route`` with a JSON body; the JSON answer, or None for 204."""
        response = await self.request("POST", route, json=body, params=params)
        return None if response.status_code == 204 or not response.content else response.json()

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, *, params: Mapping[str, str | int | bool] | None = None
    ) -> AsyncIterator[httpx.Response]:
        """A response whose body is read as it comes (downloads)."""
        client = self._client()
        request = client.build_request(method, path, params=_query(params))
        try:
            response = await client.send(request, stream=True)
        except httpx.ConnectError as e:
            if not self.autostart:
                raise self._unavailable(e) from e
            await self._ensure_started()
            try:
                response = await client.send(request, stream=True)
            except httpx.TransportError as e2:
                raise self._unavailable(e2) from e2
        except httpx.TransportError as e:
            raise self._unavailable(e) from e
        try:
            if response.status_code >= 400:
                body = await response.aread()
                raise error_from_response(response.status_code, body)
            yield response
        finally:
            await response.aclose()

    @asynccontextmanager
    async def websocket(self, path: str) -> AsyncIterator[ClientConnection]:
        """A WebSocket to ``path`` (``/v1/sandboxes/{id}/exec/stream``)."""
        options: dict[str, Any] = {
            "additional_headers": self._headers(),
            "compression": None,
            "max_size": WS_MAX_MESSAGE,
            "ping_interval": None,
            "open_timeout": 30,
            "proxy": None,
        }
        try:
            if self.url is None:
                ws = await unix_connect(str(self.socket_path), f"ws://nova{path}", **options)
            else:
                parts = urlsplit(self.url)
                scheme = "wss" if parts.scheme == "https" else "ws"
                base = parts.path.rstrip("/")
                ws = await connect(f"{scheme}://{parts.netloc}{base}{path}", **options)
        except OSError as e:
            raise self._unavailable(e) from e
        except Exception as e:  # an HTTP answer instead of an upgrade
            raise _upgrade_error(e) from e
        try:
            yield ws
        finally:
            await ws.close()


def _query(params: Mapping[str, str | int | bool] | None) -> dict[str, str] | None:
    if not params:
        return None
    out: dict[str, str] = {}
    for key, value in params.items():
        out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def _replayable(content: Any) -> bool:
    return content is None or isinstance(content, (bytes, str))


def _read_token() -> str | None:
    try:
        return (nova_home() / TOKEN_FILE).read_text().strip() or None
    except (OSError, RuntimeError):
        return None


def _upgrade_error(e: Exception) -> NovaError:
    """The typed error of a refused WebSocket upgrade (its problem body)."""
    from websockets.exceptions import InvalidStatus

    if isinstance(e, InvalidStatus):
        return error_from_response(e.response.status_code, bytes(e.response.body or b""))
    return NovaError(f"WebSocket failed: {e}", code="websocket_error")


def encode_query(params: Mapping[str, str | int | bool]) -> str:
    """``?a=1&b=true`` for a WebSocket path."""
    query = _query(params)
    return f"?{urlencode(query)}" if query else ""
