"""A fault-injecting HTTP proxy for tests that put an unreliable network in
front of the local S3 server.

Real object stores throttle and drop connections; jobs that write to S3 must
survive that without losing or duplicating output.  ``FaultyProxy`` sits
between an S3 client and an upstream server (e.g. ``support.s3_server``) and,
for a seeded random fraction of requests, injects one of three faults:

``"503"``
    answers ``503 Slow Down`` with an S3 ``SlowDown`` error body and does not
    forward the request (a throttle; clients treat it as retryable);
``"reset"``
    resets the client connection (TCP RST) without forwarding the request;
``"reset_after"``
    forwards the request, waits for upstream's whole response, then resets
    the client connection: the request took effect but the client never hears
    so, the hard case for exactly-once writes.

Everything else is passed through byte for byte, so SigV4 signatures (which
cover the ``Host`` header the client used, i.e. the proxy's address) still
verify upstream.  Each client connection carries exactly one request: the
proxy forces ``Connection: close`` on both sides, which keeps it free of
keep-alive bookkeeping and makes every request a fresh fault opportunity.

Typical use::

    with FaultyProxy("127.0.0.1", s3_port, fault_rate=0.05) as proxy:
        options = {**storage_options, "endpoint_url": proxy.endpoint_url}
        ...
        assert proxy.stats["reset_after"] > 0
"""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable

LOOPBACK = "127.0.0.1"
FAULT_KINDS = ("503", "reset", "reset_after")

_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_MAX_HEAD_LINES = 200


class _BadRequest(Exception):
    pass


def _read_head(rfile) -> list[bytes]:
    """Start line and header lines (CRLF kept), up to the blank line."""
    lines: list[bytes] = []
    while True:
        line = rfile.readline(65537)
        if not line:
            raise _BadRequest("connection closed mid-head" if lines else "no request")
        if line in (b"\r\n", b"\n"):
            if lines:
                return lines
            continue  # tolerate stray CRLF before a request line
        lines.append(line)
        if len(lines) > _MAX_HEAD_LINES:
            raise _BadRequest("too many header lines")


def _header(lines: list[bytes], name: bytes) -> bytes | None:
    for line in lines[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


def _without(lines: list[bytes], names: Iterable[bytes]) -> list[bytes]:
    drop = set(names)
    out = [lines[0]]
    for line in lines[1:]:
        key, sep, _ = line.partition(b":")
        if not (sep and key.strip().lower() in drop):
            out.append(line)
    return out


def _read_exact(rfile, size: int) -> bytes:
    data = rfile.read(size)
    if len(data) != size:
        raise _BadRequest("connection closed mid-body")
    return data


def _read_chunked(rfile) -> bytes:
    """A chunked body, framing and trailers included, exactly as sent."""
    parts: list[bytes] = []
    while True:
        size_line = rfile.readline(65537)
        if not size_line.endswith(b"\n"):
            raise _BadRequest("connection closed mid-chunk")
        parts.append(size_line)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise _BadRequest(f"bad chunk size line {size_line!r}") from exc
        if size == 0:
            while True:  # trailers, then the blank line
                trailer = rfile.readline(65537)
                if not trailer.endswith(b"\n"):
                    raise _BadRequest("connection closed in trailers")
                parts.append(trailer)
                if trailer in (b"\r\n", b"\n"):
                    return b"".join(parts)
        parts.append(_read_exact(rfile, size + 2))  # data + CRLF


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _simple_response(status: bytes, body: bytes, *, head_only: bool, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: application/xml\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        + extra
        + b"Connection: close\r\n\r\n"
        + (b"" if head_only else body)
    )


class FaultyProxy:
    """HTTP proxy on 127.0.0.1 that injects faults into a fraction of requests.

    ``fault_rate`` is the probability that a request gets a fault; the kind is
    then drawn uniformly from ``kinds``.  Draws come from ``random.Random(seed)``
    in request arrival order (deterministic for sequential clients).  Set
    ``faults_enabled = False`` to pass everything through, e.g. during set-up.
    With ``every=N`` the schedule is fixed instead: every N-th request gets a
    fault, the kinds taken in turn, so a test of K requests sees K // N faults
    and every kind once K >= N * len(kinds), whatever the clients' concurrency.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        fault_rate: float = 0.05,
        seed: int = 0,
        kinds: Iterable[str] = FAULT_KINDS,
        timeout: float = 30.0,
        every: int | None = None,
    ) -> None:
        kinds = tuple(kinds)
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}, got {kinds}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate}")
        self.upstream = (upstream_host, upstream_port)
        self.fault_rate = fault_rate
        self.kinds = kinds
        self.timeout = timeout
        self.every = every
        self.faults_enabled = True
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stats: Counter[str] = Counter({"requests": 0, **{k: 0 for k in FAULT_KINDS}})
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> "FaultyProxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> "FaultyProxy":
        if self._listener is not None:
            raise RuntimeError("FaultyProxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((LOOPBACK, 0))
        listener.listen(128)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"faulty-proxy-{self._port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting; requests already in flight finish on daemon threads."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        except OSError:
            pass
        listener.close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultyProxy not started")
        return self._port

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def stats(self) -> dict[str, int]:
        """Snapshot: ``requests`` (all requests read) and one count per fault kind."""
        with self._lock:
            return dict(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            for key in self._stats:
                self._stats[key] = 0

    # -- serving -------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # listener closed by stop()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _draw_fault(self) -> str | None:
        with self._lock:
            self._stats["requests"] += 1
            if not self.faults_enabled:
                return None
            if self.every is not None:
                n = self._stats["requests"]
                if n % self.every:
                    return None
                kind = self.kinds[(n // self.every - 1) % len(self.kinds)]
            elif self._rng.random() >= self.fault_rate:
                return None
            else:
                kind = self._rng.choice(self.kinds)
            self._stats[kind] += 1
            return kind

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(self.timeout)
        graceful = False
        try:
            graceful = self._handle(client)
        except OSError:
            pass
        finally:
            if graceful:
                client.close()
            else:
                _reset(client)

    def _handle(self, client: socket.socket) -> bool:
        """Serve one request; False means the connection is to be reset."""
        # The file object must be closed before the socket, or socket.close()
        # only drops a reference and neither FIN nor RST goes out.
        with client.makefile("rb") as rfile:
            try:
                head = _read_head(rfile)
                expects_continue = (_header(head, b"expect") or b"").lower() == b"100-continue"
                if expects_continue:
                    # aiohttp holds a PUT body back until it sees this.
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                if _header(head, b"transfer-encoding") is not None:
                    body = _read_chunked(rfile)
                else:
                    body = _read_exact(rfile, int(_header(head, b"content-length") or 0))
            except (_BadRequest, ValueError):
                return False
        head_only = head[0].split(b" ", 1)[0].upper() == b"HEAD"

        fault = self._draw_fault()
        if fault == "reset":
            return False
        if fault == "503":
            client.sendall(
                _simple_response(
                    b"503 Slow Down", _SLOW_DOWN_BODY, head_only=head_only, extra=b"Retry-After: 0\r\n"
                )
            )
            return True

        # The client already got its 100 Continue from us, so ``Expect``
        # (never signed by SigV4) is dropped rather than forwarded.
        drop = [b"connection", b"proxy-connection", b"keep-alive"]
        if expects_continue:
            drop.append(b"expect")
        request = b"".join(_without(head, drop)) + b"Connection: close\r\n\r\n" + body
        try:
            upstream = socket.create_connection(self.upstream, timeout=self.timeout)
        except OSError:
            client.sendall(_simple_response(b"502 Bad Gateway", b"", head_only=True))
            return True
        with upstream:
            upstream.sendall(request)
            if fault == "reset_after":
                while upstream.recv(65536):  # the whole response, discarded
                    pass
                return False
            self._relay_response(upstream, client)
        return True

    @staticmethod
    def _relay_response(upstream: socket.socket, client: socket.socket) -> None:
        """Upstream's response with ``Connection: close``, then the rest as is."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = upstream.recv(65536)
            if not chunk:
                client.sendall(buf)
                return
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = [line + b"\r\n" for line in head.split(b"\r\n")]
        lines = _without(lines, (b"connection", b"keep-alive"))
        client.sendall(b"".join(lines) + b"Connection: close\r\n\r\n" + rest)
        while True:
            chunk = upstream.recv(65536)
            if not chunk:
                return
            client.sendall(chunk)
