"""The HTTP edge's guards (serve/web/app.py): what a JSON input may hold, and uvicorn's own refusals as JSON.

A request body is checked here before numpy sees it: only JSON numbers, in
lists nested no deeper than F's input shape, so strings, booleans, nulls and
objects are refused by name (numpy would read ``"0.1"`` and ``true`` as
numbers, and ``null`` as NaN) and a deeply nested body costs a few list
passes, never a recursion. A request whose head uvicorn's HTTP parser refuses
(a Content-Length that is not a number of bytes, say) gets the same JSON
``{"detail": reason}`` as the service's other refusals.
"""
import json
import math
import re
from typing import Optional


NUMBERS = {int, float}
KINDS = {str: "string", bool: "boolean", type(None): "null", dict: "object"}  # JSON's names


def describe(value) -> str:
    """A JSON value that is not a number, as a refusal names it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"\"{value[:20]}{'...' if len(value) > 20 else ''}\""
    return "an object" if isinstance(value, dict) else type(value).__name__


def numbers_refusal(value, shape: tuple, where: str) -> Optional[str]:
    """Why ``value`` is not JSON numbers in lists nested at most ``len(shape)`` deep (F's input shape, or flat),
    naming what was found instead; None when it is. A level at a time, so it is cheap and never recurses."""
    level = [value]
    for _ in range(len(shape) + 1):
        kinds = set(map(type, level))
        odd = kinds - NUMBERS - {list}
        if odd:
            found = [v for v in level if type(v) in odd]
            what = ", ".join(sorted({KINDS.get(type(v), type(v).__name__) for v in found}))
            first = describe(found[0]) if len(found) == 1 else f"the first {describe(found[0])}"
            return (f"{where} holds {len(found)} {'value' if len(found) == 1 else 'values'} of kind {what} "
                    f"({first}) where F takes numbers; send an array of numbers in F's input shape {list(shape)}")
        if list not in kinds or kinds & NUMBERS:  # numbers only, or a ragged array numpy's shape check names
            return None
        level = [v for sub in level for v in sub]
    return (f"{where} nests arrays more than {len(shape)} deep; F takes {list(shape)} (or {math.prod(shape)} "
            f"numbers flat)") if level else None


def bad_head_reason(head: bytes) -> str:
    """Why HTTP's parser refused a request whose bytes so far are ``head``: its Content-Length if that is what
    was wrong (the reason :func:`read_body` gives), else a general one."""
    lengths = re.findall(rb"\r\ncontent-length:[ \t]*([^\r\n]*)", head, re.IGNORECASE)
    if lengths:
        value = lengths[-1].strip().decode("latin-1")
        if not value.isdigit():
            return f"Content-Length {value[:40]!r} is not a number of bytes"
        if len({v.strip() for v in lengths}) > 1:
            return "the request's Content-Length headers disagree"
    return "the request is not valid HTTP/1.1 (its request line or headers could not be read)"


def json_refusing_protocol():
    """uvicorn's HTTP/1.1 protocol (httptools or h11, as uvicorn picks), answering a request its parser refuses
    (a bad Content-Length, a malformed header) with the JSON ``{"detail": reason}`` of every other refusal
    instead of plain text."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class JsonRefusals(AutoHTTPProtocol):
        seen = b""

        def data_received(self, data: bytes) -> None:
            # the request's last 16 KiB (its head, for the reason), without joining a large chunk to it
            self.seen = data[-16384:] if len(data) >= 16384 else (self.seen + data)[-16384:]
            super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"detail": bad_head_reason(self.seen)}).encode()
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return JsonRefusals


def server_config(app, host: str, port: int, **options):
    """uvicorn's config for the service's ASGI ``app``: HTTP/1.1 whose parser's refusals are JSON too."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=json_refusing_protocol(), **options)
