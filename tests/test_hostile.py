"""The hostile-input lists of the hardening rounds, re-run each time: bad bodies, bad keys, signal offsets.

Each list is what a round of trying the service and the commands as a hostile
user found (issue 32 and the rounds before it), so the next round starts from
them. The bodies run here in-process through the service's own body reading
and parsing (no Ray, no HTTP: cheap); ``tests/test_app.py`` sends the same
lists over HTTP to a served code and checks the service stays healthy after
each. A new finding goes into its list.
"""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

SHAPE = (1, 8, 8)  # the digits F of the suite's served run

# (body, Content-Type, status, a piece of the reason, a piece the reason must not hold)
BAD_BODIES = [
    (b"[1, 2", "application/json", 400, "not JSON", None),
    (b"[[1, 2], [3]]", "application/json", 422, "not an array of numbers", None),
    (b'["a"]', "application/json", 422, "kind string", None),
    (json.dumps([0.5] * 63).encode(), "application/json", 422, "shape [63]", None),
    (json.dumps([[0.5] * 8] * 8).encode(), "application/json", 422, "shape [8, 8]", None),
    (("[NaN" + ", 0" * 63 + "]").encode(), "application/json", 422, "non-finite", None),
    (json.dumps([1e39] * 64).encode(), "application/json", 422, "non-finite", None),
    (b'{"inputs": []}', "application/json", 422, "only \"input\"", None),
    (b"\x89PNG not really", "image/png", 422, "not an image", None),
    (b"<xml/>", "application/xml", 415, "application/xml", None),
    (json.dumps([0.5] * 64 * 200).encode(), "application/json", 413, "max_body_bytes", None),
    # issue 32: strings, booleans, nulls and mixed types were read as numbers (or null as "non-finite")
    (json.dumps(["0.1"] * 64).encode(), "application/json", 422, "64 values of kind string", None),
    (json.dumps([True] * 64).encode(), "application/json", 422, "64 values of kind boolean", None),
    (json.dumps([0.1] * 63 + ["1e3"]).encode(), "application/json", 422, "1 value of kind string (\"1e3\")", None),
    (json.dumps([None] * 64).encode(), "application/json", 422, "kind null", "non-finite"),
    (json.dumps([0.5] * 62 + [False, {"a": 1}]).encode(), "application/json", 422, "boolean, object", None),
    (json.dumps({"input": [[["0.5"] * 8] * 8]}).encode(), "application/json", 422, "kind string", None),
    (b"[" + b"1" + b"0" * 400 + b"]", "application/json", 422, "beyond float32", None),
    # issue 32: nested 1,000 deep was a RecursionError and a 500; a few levels too deep reach numpy's 64-dim limit
    (b"[" * 1000 + b"]" * 1000, "application/json", 422, "nests", None),  # by the parser's limit, or the shape's
    (b"[" * 200 + b"0.5" + b"]" * 200, "application/json", 422, "nests arrays more than 3 deep", None),
]

BAD_BATCH_BODIES = [
    (json.dumps([["0.5"] * 64]).encode(), 422, "input 0 holds 64 values of kind string"),
    (json.dumps({"inputs": [[0.5] * 64, [None] * 64]}).encode(), 422, "input 1 holds 64 values of kind null"),
    (json.dumps({"inputs": [[0.5] * 64, [0.5] * 3]}).encode(), 422, "input 1 has shape [3]"),
    (b"[" * 1000 + b"]" * 1000, 422, "nests"),
    (json.dumps([[[[[0.5]]]]]).encode(), 422, "input 0 nests arrays more than 3 deep"),
    (b"[]", 422, "non-empty JSON array"),
]

MAX_BODY = 4096  # app.max_body_bytes of the services these lists are sent to


class Request:
    """What the body readers use of a request: its headers and its body, streamed in pieces."""

    def __init__(self, body: bytes, kind: str):
        self.body, self.headers = body, {"content-type": kind, "content-length": str(len(body))}

    async def stream(self):
        for i in range(0, len(self.body), 1000):
            yield self.body[i:i + 1000]


def read(body: bytes, kind: str, batch: bool):
    """The inputs the service reads from ``body``, or its refusal (BadInput)."""
    from serve.app import parse_inputs, read_body

    async def go():
        request = Request(body, kind)
        return await parse_inputs(request, await read_body(request, MAX_BODY), SHAPE, "digits", batch, 64)

    return asyncio.run(go())


@pytest.mark.parametrize("body,kind,status,reason,absent", BAD_BODIES, ids=[f"{i}" for i in range(len(BAD_BODIES))])
def test_every_bad_body_is_refused_with_its_status_and_a_one_line_reason(body, kind, status, reason, absent):
    from serve.app import BadInput

    with pytest.raises(BadInput) as refused:
        read(body, kind, batch=False)
    assert refused.value.status == status, refused.value.reason
    assert reason in refused.value.reason and "\n" not in refused.value.reason
    assert absent is None or absent not in refused.value.reason


def test_every_bad_batch_is_refused_naming_the_input():
    from serve.app import BadInput

    for body, status, reason in BAD_BATCH_BODIES:
        with pytest.raises(BadInput) as refused:
            read(body, "application/json", batch=True)
        assert (refused.value.status, reason in refused.value.reason) == (status, True), refused.value.reason


def test_numbers_in_the_shape_or_flat_are_read_as_they_were_sent():
    x = np.random.default_rng(0).uniform(-3, 3, 64).astype(np.float32)
    for body in (json.dumps(x.tolist()), json.dumps({"input": x.reshape(SHAPE).tolist()})):
        (got,) = read(body.encode(), "application/json", batch=False)
        assert got.shape == SHAPE and np.array_equal(got.ravel(), x)
    ints = read(json.dumps([[1] * 64, [[[2] * 8] * 8]]).encode(), "application/json", batch=True)
    assert [float(a.mean()) for a in ints] == [1.0, 2.0]


def test_a_bad_head_is_named_by_its_content_length():
    from serve.edge import bad_head_reason

    assert bad_head_reason(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n") == \
        "Content-Length 'abc' is not a number of bytes"
    assert "not a number" in bad_head_reason(b"POST / HTTP/1.1\r\ncontent-length: -5\r\n\r\n")
    assert "disagree" in bad_head_reason(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n")
    assert "not valid HTTP" in bad_head_reason(b"GARBAGE\r\n\r\n")
