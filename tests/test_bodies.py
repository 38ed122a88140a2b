"""Binary request bodies (serve/web/bodies.py, through serve.app's reader): raw float32 and .npy read as the JSON
body of the same numbers is read, and every malformed one refused with a 4xx and a one-line reason."""
import asyncio
import io
import json

import numpy as np
import pytest

SHAPE = (1, 8, 8)  # the digits run's F input


class Request:
    """What the body readers use of a request: headers, query parameters, the body streamed in pieces."""

    def __init__(self, body: bytes, headers: dict, query: dict):
        self.body, self.query_params = body, query
        self.headers = {k.lower(): v for k, v in headers.items()} | {"content-length": str(len(body))}

    async def stream(self):
        for i in range(0, len(self.body), 1000):
            yield self.body[i:i + 1000]


def read(body: bytes, headers: dict, batch: bool, query=None):
    from serve.app import parse_inputs, read_body

    async def go():
        request = Request(body, headers, query or {})
        return await parse_inputs(request, await read_body(request, 1 << 20), SHAPE, "digits", batch, 64)

    return np.stack(asyncio.run(go()))


def npy(x) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


RAW = {"Content-Type": "application/octet-stream"}
NPY = {"Content-Type": "application/x-npy"}
JSON = {"Content-Type": "application/json"}


def test_raw_and_npy_bodies_read_as_the_json_body_of_the_same_numbers():
    x = np.random.default_rng(0).uniform(-3, 3, (5, *SHAPE)).astype(np.float32)
    one = read(json.dumps(x[0].tolist()).encode(), JSON, batch=False)
    for body, headers, query in ((x[0].tobytes(), RAW, None), (x[0].tobytes(), {**RAW, "X-Shape": "1,8,8"}, None),
                                 (x[0].tobytes(), {**RAW, "X-Dtype": "float32"}, {"shape": "64"}),
                                 (npy(x[0]), NPY, None), (npy(x[0].ravel().astype(np.float64)), NPY, None)):
        assert np.array_equal(read(body, headers, False, query), one), headers
    many = read(json.dumps(x.tolist()).encode(), JSON, batch=True)
    assert many.shape == (5, *SHAPE) and np.array_equal(many, x)
    for body, headers in ((x.tobytes(), RAW), (x.tobytes(), {**RAW, "X-Shape": "5,64"}), (npy(x), NPY),
                          (npy(x.reshape(5, 64)), NPY)):
        assert np.array_equal(read(body, headers, True), many), headers


BAD = [  # (body, headers, batch, status, a piece of the reason)
    (np.zeros(63, np.float32).tobytes(), RAW, False, 422, "not a whole number of F's inputs"),
    (np.zeros(64, np.float32).tobytes()[:-2], RAW, False, 422, "truncated"),
    (np.zeros(64, np.float32).tobytes(), {**RAW, "X-Dtype": "float64"}, False, 415, "X-Dtype 'float64'"),
    (np.zeros(64, np.float32).tobytes(), {**RAW, "X-Shape": "2,8,8"}, False, 422, "needs 512 bytes"),
    (np.zeros(64, np.float32).tobytes(), {**RAW, "X-Shape": "8,8"}, False, 422, "shape [8, 8]"),
    (np.zeros(64, np.float32).tobytes(), {**RAW, "X-Shape": "one"}, False, 400, "not a shape"),
    (np.zeros(128, np.float32).tobytes(), RAW, False, 422, "/predict takes one input, got 2"),
    (b"", RAW, False, 422, "not a whole number"),
    (np.full(64, np.nan, np.float32).tobytes(), RAW, False, 422, "non-finite"),
    (npy(np.zeros(64))[:-8], NPY, False, 400, "not a .npy array"),
    (b"plainly not numpy", NPY, False, 400, "not a .npy array"),
    (npy(np.array(["a"] * 64)), NPY, False, 422, "F takes numbers"),
    (npy(np.zeros((3, 7), np.float32)), NPY, True, 422, "shape [3, 7]"),
    (npy(np.full(64, 1e300)), NPY, False, 422, "non-finite"),
]


@pytest.mark.parametrize("body,headers,batch,status,reason", BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_bad_binary_body_gets_a_4xx_naming_what_is_wrong(body, headers, batch, status, reason):
    from serve.app import BadInput

    with pytest.raises(BadInput) as refused:
        read(body, headers, batch)
    assert refused.value.status == status and reason in refused.value.reason, refused.value.reason
    assert "\n" not in refused.value.reason


def test_a_pickled_npy_is_refused_not_loaded():
    from serve.app import BadInput

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadInput) as refused:
        read(buf.getvalue(), NPY, False)
    assert refused.value.status == 400
