"""The service's hot endpoints as plain ASGI: ``POST /predict`` and ``POST /predict/batch`` without the framework.

One query per request is bound by what the front end spends on each request
(docs/throughput.md). FastAPI's routing, its request and response objects and
Starlette's body stream cost more CPU a request than everything lcc does for
the query; so :class:`HotPath` answers the two POST endpoints itself, over the
same functions the FastAPI routes call (serve/web/app.py's ``answer``: the
admission before the body is read, every 4xx, the 503 with ``Retry-After``),
and hands everything else (``/health``, ``/metrics``, the docs, other methods)
to the FastAPI app. It counts its responses for ``/metrics`` as
:class:`serve.web.exposition.Counted` counts the others, and answers a failure
of its own with the same JSON 500 the app's exception handler gives.
"""
from __future__ import annotations

import logging
from typing import Awaitable, Callable
from urllib.parse import parse_qsl

import orjson

JSON = [(b"content-type", b"application/json")]
HOT = ("/predict", "/predict/batch")


class ClientGone(Exception):
    """The client hung up before the whole body arrived."""


class Incoming:
    """What the service reads of a request: its headers (lower-case names, the first of repeated ones), its
    query parameters, its scope and its body stream; the part of Starlette's Request the service uses."""

    __slots__ = ("scope", "receive", "headers", "_query")

    def __init__(self, scope, receive):
        self.scope, self.receive = scope, receive
        headers: dict = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        self.headers = headers
        self._query = None

    @property
    def query_params(self) -> dict:
        if self._query is None:
            self._query = dict(parse_qsl(self.scope.get("query_string", b"").decode("latin-1"),
                                         keep_blank_values=True))
        return self._query

    async def stream(self):
        """The body's chunks as they come; ClientGone if the client hangs up first."""
        while True:
            message = await self.receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return
            elif message["type"] == "http.disconnect":
                raise ClientGone()


def failure_reason(exc: Exception) -> str:
    """What a client is told of a failure of the service's own (its 500): the kind, never the details."""
    return f"internal error ({type(exc).__name__}); the service's log has the details"


Answer = Callable[[Incoming, bool], Awaitable[tuple]]  # (request, batch) -> (status, body, extra headers)


class HotPath:
    """ASGI: the two POST endpoints through ``answer``, the rest through ``app``; see the module docstring."""

    def __init__(self, app, answer: Answer, responses: dict):
        self.app, self.answer, self.responses = app, answer, responses

    async def __call__(self, scope, receive, send):
        path = scope.get("path")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in HOT:
            return await self.app(scope, receive, send)
        try:
            status, body, headers = await self.answer(Incoming(scope, receive), path == "/predict/batch")
        except Exception as exc:  # a bug of the service's own: logged, a JSON 500, as the app's handler does
            logging.getLogger("lcc.serve").error("POST %s failed", path, exc_info=exc)
            status, headers = 500, []
            body = orjson.dumps({"detail": failure_reason(exc)})
        await send({"type": "http.response.start", "status": status,
                    "headers": JSON + [(b"content-length", b"%d" % len(body))] + headers})
        await send({"type": "http.response.body", "body": body})
        key = (path, status)
        self.responses[key] = self.responses.get(key, 0) + 1
