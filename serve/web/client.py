"""A lean HTTP/1.1 client for load generation: kept-alive connections, requests prebuilt as bytes.

A load generator on the machine it measures takes CPU from the server, and
one that tops out below the server's rate measures itself (an httpx client
near 150 requests/s on a 2-core machine, aiohttp's about 4,000 a core). This
one writes each request as one prebuilt block of bytes on a connection of its
pool and reads the answer by its Content-Length on an asyncio protocol: a few
tens of microseconds a request. It speaks only what the service and the bare
stack answer (a status line, headers, a body of Content-Length bytes; a
connection the server closes is opened again), which is all a benchmark needs.
"""
from __future__ import annotations

import asyncio
import collections
import re
from typing import Optional
from urllib.parse import urlsplit

LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


def request_bytes(host: str, path: str, body: bytes, headers: dict) -> bytes:
    """One POST, ready to write."""
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class Connection(asyncio.Protocol):
    """One kept-alive connection: one request at a time, its answer as ``(status, body)``."""

    def __init__(self):
        self.buf = bytearray()
        self.waiter: Optional[asyncio.Future] = None
        self.transport = None
        self.closed = False
        self.answered = 0  # answers read on this connection

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        m = LENGTH.search(self.buf, 0, end + 2)
        size = int(m.group(1)) if m else 0
        if len(self.buf) < end + 4 + size:
            return
        status = int(self.buf[9:12])
        body = bytes(self.buf[end + 4:end + 4 + size])
        if CLOSE.search(self.buf, 0, end + 2):  # the server closes it after this answer: not reused
            self.closed = True
            self.transport.close()
        del self.buf[:end + 4 + size]
        waiter, self.waiter = self.waiter, None
        self.answered += 1
        if not waiter.done():
            waiter.set_result((status, body))

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the server closed the connection"))

    def send(self, data: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter


class Client:
    """At most ``connections`` connections to ``url``'s host; :meth:`post` waits for a free one."""

    def __init__(self, url: str, connections: int):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.netloc = parts.netloc
        self.limit = connections
        self.free: collections.deque = collections.deque()
        self.opened = 0
        self.waiting: collections.deque = collections.deque()

    async def _take(self) -> Connection:
        while self.free:
            conn = self.free.pop()
            if not conn.closed:
                return conn
            self.opened -= 1
        if self.opened < self.limit:
            self.opened += 1
            try:
                _, conn = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
            except OSError:
                self.opened -= 1
                raise
            return conn
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        return await fut

    def _give(self, conn: Connection) -> None:
        if conn.closed:
            self.opened -= 1
            conn = None
        while self.waiting:
            fut = self.waiting.popleft()
            if fut.done():
                continue
            if conn is None:  # a slot freed: the waiter opens its own connection
                self.opened += 1
                asyncio.ensure_future(self._open_for(fut))
            else:
                fut.set_result(conn)
            return
        if conn is not None:
            self.free.append(conn)

    async def _open_for(self, fut: asyncio.Future) -> None:
        try:
            _, conn = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
        except OSError as exc:
            self.opened -= 1
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(conn)

    async def post(self, data: bytes) -> tuple[int, bytes]:
        """Send one prebuilt request (:func:`request_bytes`); its ``(status, body)``. A kept-alive connection the
        server closed before answering (it had not seen the request) is replaced and the request sent once more;
        OSError / ConnectionError when that fails too, or a fresh connection fails."""
        conn = await self._take()
        try:
            return await conn.send(data)
        except ConnectionError:
            if not conn.answered:  # a fresh connection failed: the server's doing, not a race with its close
                raise
        finally:
            self._give(conn)
        conn = await self._take()  # once more: the server had not seen it on the connection it closed
        try:
            return await conn.send(data)
        finally:
            self._give(conn)

    def close(self) -> None:
        for conn in self.free:
            if conn.transport is not None:
                conn.transport.close()
        self.free.clear()
