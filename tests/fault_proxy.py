"""A fault-injecting HTTP proxy for tests, in front of a local S3 server (moto).

It listens on 127.0.0.1 only and forwards each request on its own upstream connection
(``Connection: close`` both ways, so every request is one TCP connection and a fault
hits exactly one request). Faults are armed for the next N requests that match a
predicate, and each kind reproduces something a real object store or network does:

- ``fail``: answer HTTP 500 without forwarding (the request is not applied);
- ``drop``: close the connection after reading the request, without forwarding it;
- ``lose_response``: forward the request (the server applies it), then close the
  connection instead of answering: the client cannot tell whether it was applied;
- ``stall``: hold matching requests without answering until the stall ends (then
  they are forwarded: a slow server, not a lost one) or the proxy closes.

Every fault that fired is counted in ``fired``, so a test can check that its fault
really happened. Threads only; everything stops in `close` (bounded joins).
"""

from __future__ import annotations

import collections
import dataclasses
import socket
import threading
import time
from collections.abc import Callable

__all__ = ["FaultProxy", "Request"]

_MAX_HEAD = 64 << 10


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str  # the request target, e.g. "/bucket/run/ckpt-1/w/zarr.json?x-id=PutObject"


def any_request(_: Request) -> bool:
    return True


@dataclasses.dataclass
class _Fault:
    kind: str
    remaining: int
    match: Callable[[Request], bool]
    until: float = 0.0


class FaultProxy:
    """``FaultProxy(upstream_port)``; ``.endpoint`` is the URL clients should use."""

    def __init__(self, upstream_port: int):
        self._upstream = ("127.0.0.1", upstream_port)
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._closed = threading.Event()
        self._release = threading.Event()
        self.fired: collections.Counter = collections.Counter()
        self.requests: list[Request] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    # -- arming faults ----------------------------------------------------------------

    def fail(self, count: int, match=any_request) -> None:
        self._arm(_Fault("fail", count, match))

    def drop(self, count: int, match=any_request) -> None:
        self._arm(_Fault("drop", count, match))

    def lose_response(self, count: int, match=any_request) -> None:
        self._arm(_Fault("lose_response", count, match))

    def stall(self, seconds: float, match=any_request, count: int = 1 << 30) -> None:
        """Holds the next ``count`` matching requests until ``seconds`` pass or `heal`."""
        self._release.clear()
        self._arm(_Fault("stall", count, match, until=time.monotonic() + seconds))

    def heal(self) -> None:
        """Disarms every fault and lets stalled requests through."""
        with self._lock:
            self._faults.clear()
        self._release.set()

    def reset(self) -> None:
        """`heal`, and forget the counts and the requests seen."""
        self.heal()
        with self._lock:
            self.fired.clear()
            self.requests.clear()

    def _arm(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take(self, request: Request) -> _Fault | None:
        with self._lock:
            self.requests.append(request)
            for fault in self._faults:
                if fault.until and time.monotonic() >= fault.until:
                    fault.remaining = 0
                if fault.remaining > 0 and fault.match(request):
                    fault.remaining -= 1
                    self.fired[fault.kind] += 1
                    return fault
            self._faults = [f for f in self._faults if f.remaining > 0]
        return None

    # -- serving ----------------------------------------------------------------------

    def close(self) -> None:
        self._closed.set()
        self._release.set()
        self._acceptor.join(timeout=10)
        self._server.close()
        with self._lock:
            for conn in list(self._connections):
                _close(conn)
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self._connections.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30)
            head, body = _read_request(conn)
            if head is None:
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            fault = self._take(Request(request_line[0], request_line[1]))
            kind = fault.kind if fault else None
            if kind == "fail":
                conn.sendall(_error_response(500, "InternalError"))
                return
            if kind == "drop":
                return
            if kind == "stall":
                while not self._release.is_set() and not self._closed.is_set() \
                        and time.monotonic() < fault.until:
                    self._release.wait(0.1)
                if self._closed.is_set():
                    return
            response = self._forward(head, body)
            if kind == "lose_response":
                return
            conn.sendall(response)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.discard(conn)
            _close(conn)

    def _forward(self, head: bytes, body: bytes) -> bytes:
        lines = [line for line in head.split(b"\r\n")
                 if not line.lower().startswith((b"connection:", b"expect:"))]
        head = b"\r\n".join([*lines, b"Connection: close"])
        with socket.create_connection(self._upstream, timeout=30) as up:
            up.sendall(head + b"\r\n\r\n" + body)
            chunks = []
            while data := up.recv(1 << 16):
                chunks.append(data)
        return b"".join(chunks)


def _read_request(conn: socket.socket) -> tuple[bytes | None, bytes]:
    """Reads one request (head without the blank line, and its Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return None, b""
        data += chunk
        if len(data) > _MAX_HEAD:
            raise OSError("request head too large")
    head, _, body = data.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    if b"transfer-encoding" in headers:
        raise OSError("chunked request bodies are not supported by this proxy")
    length = int(headers.get(b"content-length", 0))
    if b"100-continue" in headers.get(b"expect", b"") and len(body) < length:
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    while len(body) < length:
        chunk = conn.recv(min(1 << 16, length - len(body)))
        if not chunk:
            return None, b""
        body += chunk
    return head, body


def _error_response(status: int, code: str) -> bytes:
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>injected by the test proxy</Message></Error>").encode()
    return (f"HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()
