"""`FaultyS3`: an HTTP proxy in front of moto's S3 server (tests/conftest.py) that answers
chosen requests with an S3 error instead (503 SlowDown, 500 InternalError, 404 ...), or
forwards them and then answers with an error, as when S3 did the work but its answer was
lost. It runs as a thread of the test process on 127.0.0.1; point an S3 client at `url`.

Used by the unit tests of corpus reads (tests/unit/test_read_s3.py) and the Ray tests of
checkpoints on S3 (tests/ray/test_pretrain_s3.py).
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
from collections import Counter
from urllib.parse import unquote, urlsplit

RESET = "reset"
PARTIAL = "partial"


class FaultyS3:
    """Forwards S3 requests to moto, except those `rule(method, key, query, n)` picks out
    (`key` is "/bucket/key", `n` counts the requests with that method and key, from 1): the
    rule returns None to forward, or (status, S3 error code, forward_first). With
    forward_first the request still reaches moto, as when S3 did the work but its answer
    was lost. (pyarrow writes every object as a multipart upload: POST ?uploads, PUT
    ?partNumber=..., POST ?uploadId=... to complete it.)

    Two codes are not S3 errors but broken connections: `RESET` closes the connection
    without an answer (a connection reset), `PARTIAL` forwards the request and sends moto's
    status and headers but only the first half of its body, then closes the connection (a
    response cut off mid-body). Their status is not sent."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.rule = None
        self.seen: Counter = Counter()
        self.failed: list[tuple[str, str, int]] = []
        self.bytes_read: Counter = Counter()
        """Bytes of object data answered to GETs, by key (what readers fetched)."""
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" for Expect

            def _handle(self):
                body = self._body()
                url = urlsplit(self.path)
                key = unquote(url.path)
                with proxy._lock:
                    proxy.seen[(self.command, key)] += 1
                    n = proxy.seen[(self.command, key)]
                    rule = proxy.rule
                    fault = (rule(self.command, key, url.query, n) if rule else None) or None
                    if fault:
                        proxy.failed.append((self.command, key, fault[0]))
                if fault is not None and fault[1] == RESET:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is None or fault[2] or fault[1] == PARTIAL:
                    status, headers, data = proxy._forward(self, body)
                    if fault is None and self.command == "GET" and status < 300:
                        with proxy._lock:
                            proxy.bytes_read[key] += len(data)
                if fault is not None and fault[1] == PARTIAL:
                    self.send_response(status)
                    for name, value in headers:
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None:
                    status, code = fault[0], fault[1]
                    data = _s3_error(code, key)
                    headers = [("Content-Type", "application/xml")]
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                if self.command != "HEAD" or fault is not None:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _forward(self, request, body: bytes):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            drop = _HOP | {"content-length"}
            headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
            if body or request.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(request.command, request.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            skip = (
                _HOP
                | {"server", "date"}
                | ({"content-length"} if request.command != "HEAD" else set())
            )
            return (
                resp.status,
                [(k, v) for k, v in resp.getheaders() if k.lower() not in skip],
                data,
            )
        finally:
            conn.close()

    def faults(self, status: int, method: str | None = None) -> Counter:
        """Injected errors with `status` (to `method` requests) by key."""
        return Counter(k for m, k, s in self.failed if s == status and method in (None, m))

    def reset(self, rule=None) -> None:
        with self._lock:
            self.rule, self.failed = rule, []
            self.seen.clear()
            self.bytes_read.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_HOP = {
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
    "upgrade", "expect",
}  # fmt: skip


def _s3_error(code: str, key: str) -> bytes:
    message = {
        "SlowDown": "Please reduce your request rate.",
        "InternalError": "We encountered an internal error. Please try again.",
    }.get(code, code)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{key}</Resource>"
        "<RequestId>FAULTYS3</RequestId><HostId>faulty-s3-proxy</HostId></Error>"
    ).encode()
