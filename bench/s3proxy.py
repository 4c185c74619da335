#!/usr/bin/env python3
"""A counting HTTP/1.1 proxy for the S3 benchmark (bench/s3.sh).

Sits in front of one S3 server on loopback and forwards every request and
answer byte for byte (headers untouched, so SigV4 signatures stay valid),
keeping connections alive as the client asks.  It counts each request by
kind and the body bytes in both directions.  Both tools of the benchmark
talk to the server through it, so they pay the same toll.

  s3proxy.py --listen-port P --upstream-port Q [--tag TEXT]

`GET /__bench/counts` (answered by the proxy itself, never forwarded)
returns the counters as JSON; the benchmark reads them before and after
each command and takes the difference.

Kinds: get (GET of an object without Range), range_get (with Range),
put (PUT, including multipart parts and copies), list (GET of a bucket:
no key, or a `list-type`/`uploads` query), head, delete (DELETE, and POST
?delete), post (other POST: multipart create/complete), other.

Standard library only.
"""

import argparse
import json
import socket
import sys
import threading
import urllib.parse

BUF = 256 * 1024
COUNTS_PATH = "/__bench/counts"


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.kinds = {}
        self.total = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.status_5xx = 0

    def add(self, kind, up, down, status):
        with self.lock:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            self.total += 1
            self.bytes_up += up
            self.bytes_down += down
            if status >= 500:
                self.status_5xx += 1

    def snapshot(self):
        with self.lock:
            return {"total": self.total, "kinds": dict(self.kinds), "bytes_up": self.bytes_up,
                    "bytes_down": self.bytes_down, "status_5xx": self.status_5xx}


COUNTERS = Counters()


class Closed(Exception):
    pass


class Reader:
    """Buffered reads from a socket: lines, heads, exact byte runs.

    With quickack, every segment read is acknowledged at once (TCP_QUICKACK
    lasts only until the kernel's next delayed acknowledgement, so it is set
    before each read).  The upstream side needs it: s3s-fs 0.14.1 does not
    set TCP_NODELAY, so the body of an answer, written after its head, waits
    in the server's Nagle buffer for the acknowledgement of the head, which
    a delayed ACK holds back some 40 ms.  That wait is the test server's,
    not the protocol's (S3 services and MinIO answer without it), and it
    would cost every request of both tools the same 40 ms."""

    def __init__(self, sock, quickack=False):
        self.sock = sock
        self.buf = bytearray()
        self.quickack = quickack

    def _fill(self):
        if self.quickack:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        data = self.sock.recv(BUF)
        if not data:
            raise Closed()
        self.buf += data

    def head(self):
        """The bytes up to and including the blank line ending a head; None at
        a clean end of stream before any byte."""
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                out = bytes(self.buf[:i + 4])
                del self.buf[:i + 4]
                return out
            if len(self.buf) > 1 << 20:
                raise Closed()
            try:
                self._fill()
            except Closed:
                if not self.buf:
                    return None
                raise

    def line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i + 2])
                del self.buf[:i + 2]
                return out
            self._fill()

    def copy(self, n, dst):
        """Forwards exactly n bytes to dst."""
        left = n
        while left > 0:
            if not self.buf:
                self._fill()
            take = min(left, len(self.buf))
            dst.sendall(self.buf[:take])
            del self.buf[:take]
            left -= take

    def copy_to_close(self, dst):
        n = 0
        while True:
            if self.buf:
                dst.sendall(self.buf)
                n += len(self.buf)
                self.buf.clear()
            try:
                self._fill()
            except Closed:
                return n


def parse_head(raw):
    lines = raw.decode("latin-1").split("\r\n")
    first = lines[0]
    headers = {}
    for ln in lines[1:]:
        if not ln:
            continue
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    return first, headers


def copy_body(reader, headers, dst):
    """Forwards a message body framed by Transfer-Encoding or Content-Length;
    returns its payload bytes (chunk framing not counted)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        n = 0
        while True:
            line = reader.line()
            dst.sendall(line)
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers up to the blank line
                    t = reader.line()
                    dst.sendall(t)
                    if t == b"\r\n":
                        return n
            reader.copy(size + 2, dst)
            n += size
    length = int(headers.get("content-length", "0") or 0)
    reader.copy(length, dst)
    return length


def kind_of(method, target, headers):
    url = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    parts = [p for p in url.path.split("/") if p]
    if method == "GET":
        if len(parts) <= 1 or "list-type" in query or "uploads" in query:
            return "list"
        return "range_get" if "range" in headers else "get"
    if method == "PUT":
        return "put"
    if method == "HEAD":
        return "head"
    if method == "DELETE":
        return "delete"
    if method == "POST":
        return "delete" if "delete" in query else "post"
    return "other"


def serve_counts(client):
    body = json.dumps(COUNTERS.snapshot()).encode()
    client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


def handle(client, upstream_port):
    upstream = None
    creader = Reader(client)
    try:
        while True:
            raw = creader.head()
            if raw is None:
                return
            first, headers = parse_head(raw)
            method, target, _ = first.split(" ", 2)
            if target.startswith(COUNTS_PATH):
                serve_counts(client)
                return
            if upstream is None:
                upstream = socket.create_connection(("127.0.0.1", upstream_port))
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                ureader = Reader(upstream, quickack=True)
            upstream.sendall(raw)
            expect = headers.get("expect", "").lower() == "100-continue"
            up = 0
            resp_raw = None
            if expect:
                resp_raw = ureader.head()
                if resp_raw is None:
                    raise Closed()
                if resp_raw.split(b" ", 2)[1] == b"100":
                    client.sendall(resp_raw)
                    resp_raw = None
                    up = copy_body(creader, headers, upstream)
                # else: a final answer without the body; the client learns from it
            else:
                up = copy_body(creader, headers, upstream)
            while True:
                if resp_raw is None:
                    resp_raw = ureader.head()
                    if resp_raw is None:
                        raise Closed()
                status_line, rh = parse_head(resp_raw)
                status = int(status_line.split(" ", 2)[1])
                client.sendall(resp_raw)
                resp_raw = None
                if 100 <= status < 200:
                    continue  # an interim answer; the final one follows
                break
            close = False
            if method == "HEAD" or status in (204, 304):
                down = 0
            elif "transfer-encoding" in rh or "content-length" in rh:
                down = copy_body(ureader, rh, client)
            else:
                down = ureader.copy_to_close(client)
                close = True
            COUNTERS.add(kind_of(method, target, headers), up, down, status)
            if close or rh.get("connection", "").lower() == "close" \
                    or headers.get("connection", "").lower() == "close":
                return
    except (Closed, OSError, ValueError, IndexError):
        return
    finally:
        for s in (client, upstream):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen-port", type=int, required=True)
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--tag", help="free text (lets the benchmark find its own process)")
    args = ap.parse_args()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.listen_port))
    srv.listen(128)
    print(f"s3proxy listening on 127.0.0.1:{args.listen_port} -> {args.upstream_port}", file=sys.stderr, flush=True)
    while True:
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(c, args.upstream_port), daemon=True).start()


if __name__ == "__main__":
    main()
