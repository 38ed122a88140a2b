"""``python -m serve.app CONFIG.json [--set KEY=VALUE ...]``: a trained code as an HTTP prediction service.

The serving config's ``app`` section picks the run, the strategy and the
HTTP edge (``--set app.strategy=none`` overrides one key); its ``instances``,
``delays``, ``slowdown``, ``failures`` and ``group_timeout_ms`` mean what they
mean to ``python -m serve``. Endpoints:

* ``POST /predict``: one input, as a JSON array in F's input shape (or flat),
  ``{"input": [...]}``, or an image (``curl -F file=@digit.png``, or the raw
  bytes with ``Content-Type: image/png``), or binary (raw float32 as
  ``application/octet-stream`` with the shape in ``X-Shape``, or ``.npy`` as
  ``application/x-npy``: serve/web/bodies.py) -> ``{"query", "class", "output",
  "rebuilt", "retried", "latency_ms"}`` (``class`` only when F is a classifier);
* ``POST /predict/batch``: ``{"inputs": [...]}``, a JSON array of inputs, or one binary body of n ->
  ``{"answers": [...]}``;
* ``GET /health``: 200 while an instance holding F is alive, else 503;
* ``GET /metrics``: counters and latency quantiles since start, Prometheus text format.

Bad input gets a 4xx with a one-line reason and never reaches an instance;
more than ``app.max_queue`` waiting queries get 503 with ``Retry-After``.
Ctrl-C stops the service, its actors and the Ray it started (exit 130).
With ``app.pool_name`` set, front ends on one Ray cluster share one pool of
instances (named Ray actors): the first starts them, the others attach
(serve/cluster/runtime.py, ``Pool``; docs/service.md, "Scaling out").

Why FastAPI + uvicorn in front of Ray Core actors rather than Ray Serve: see
docs/service.md (the dispatch core must pick each request's instance and see
each output as it lands, which Ray Serve's router hides).
"""
if __name__ == "__main__":  # python -m serve.app: a signal while the imports below run stops with one line
    from util.signals import exit_at_once

    exit_at_once("python -m serve.app")
# (the imports below come after it on purpose: importing torch takes seconds)
import asyncio
import contextlib
import io
import json
import logging
import math
import signal
import socket
import sys
from typing import Optional

import numpy as np
import orjson
import torch

from serve.web.bodies import NPY, RAW, BodyError, binary_inputs
from serve.cli import config_command, load_backup
from serve.core.config import AppConfig, ServeConfig, app_config, app_policy, load_serve_config
from serve.web.exposition import PROMETHEUS, Counted, prometheus_text  # noqa: F401  (serve.web.app.prometheus_text)
from serve.web.edge import numbers_refusal, server_config
from serve.web.hotpath import ClientGone, HotPath, failure_reason
from serve.web.online import Overloaded, Service, Unanswerable, classifier_output
from serve.core.strategies import get as strategy_of
from coders.form import form_of
from serve.core.workers import served_code
from serve.core.plan import ROLE_BACKUP, ROLE_F, check_code_fits, check_failed_instances, code_layout, pool_roles
from util import signals
from util.errors import ConfigError, UserError, exits_on_user_error
from util.signals import Terminated

# Datasets whose loaders give plain [0, 1] pixels, so an uploaded 8-bit image maps onto F's input
# by resizing and dividing by 255 (CIFAR's are normalised per channel: send JSON arrays instead).
IMAGE_DATASETS = ("digits", "mnist", "fashion-mnist")


class BadInput(Exception):
    """A request the service refuses before it reaches an instance: (HTTP status, one-line reason)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


# -- reading inputs ----------------------------------------------------------------------------------

async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 once it exceeds ``limit`` bytes (by its Content-Length, or as it streams)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise BadInput(400, f"Content-Length {length!r} is not a number of bytes")
        if int(length) > limit:
            raise BadInput(413, f"the body is {int(length)} bytes, more than app.max_body_bytes = {limit}")
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise BadInput(413, f"the body is more than app.max_body_bytes = {limit} bytes")
    except (ClientDisconnect, ClientGone):  # the answer reaches no one; it is counted, and nothing is logged
        raise BadInput(400, f"the client hung up after {size} bytes of the body") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # one chunk (the usual): no copy


def to_input(value, shape: tuple, where: str) -> np.ndarray:
    """One input as float32 in F's input ``shape``: nested in that shape, or flat."""
    reason = numbers_refusal(value, shape, where)
    if reason:
        raise BadInput(422, reason)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 becomes inf, refused below
            arr = np.asarray(value, dtype=np.float32)
    except OverflowError:  # an integer beyond a float's range
        raise BadInput(422, f"{where} holds an integer beyond float32's range") from None
    except (ValueError, TypeError):
        raise BadInput(422, f"{where} is not an array of numbers in F's input shape {list(shape)}") from None
    size = math.prod(shape)
    if arr.shape != shape and arr.shape != (size,):
        raise BadInput(422, f"{where} has shape {list(arr.shape)}; F takes {list(shape)} (or {size} numbers flat)")
    if not np.isfinite(arr).all():
        raise BadInput(422, f"{where} holds {int((~np.isfinite(arr)).sum())} non-finite numbers (NaN, infinity, or "
                            f"beyond float32)")
    return arr.reshape(shape)


def image_input(data: bytes, shape: tuple, dataset: str, where: str) -> np.ndarray:
    """An uploaded image as F's input: grey or RGB as F's channels, resized, scaled to [0, 1]."""
    if dataset not in IMAGE_DATASETS:
        raise BadInput(415, f"image uploads are read as [0, 1] pixels, which {dataset}'s F does not take; send a "
                            f"JSON array in F's input shape {list(shape)}")
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError):
        raise BadInput(422, f"{where} is not an image PIL can read (PNG, JPEG, ...)") from None
    return arr.reshape(h, w, c).transpose(2, 0, 1).copy()


async def parse_inputs(request, body: bytes, shape: tuple, dataset: str, batch: bool, max_batch: int) -> list:
    """The inputs of a /predict (one) or /predict/batch (one or more) request; BadInput when malformed."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        from starlette.requests import Request as StarletteRequest

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await StarletteRequest(request.scope, replay).form()
        except Exception as exc:  # the multipart parser's errors vary by version; all mean a malformed form
            raise BadInput(400, f"the multipart form could not be read ({type(exc).__name__})") from None
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise BadInput(422, "the form holds no file; send the image as -F file=@image.png")
        items = [image_input(await f.read(), shape, dataset, f"file '{f.filename}'") for f in files]
    elif kind.startswith("image/"):
        items = [image_input(body, shape, dataset, "the image")]
    elif kind in RAW or kind in NPY:  # binary: no JSON parse, one array for the whole request
        try:
            items = list(binary_inputs(kind, body, request.headers, getattr(request, "query_params", {}), shape,
                                       batch))
        except BodyError as exc:
            raise BadInput(exc.status, exc.reason) from None
    elif kind in ("application/json", "text/json", "", "application/x-www-form-urlencoded"):  # the last: curl -d
        try:
            try:
                value = orjson.loads(body)  # fast; what it refuses, the standard parser reads or names
            except orjson.JSONDecodeError:
                value = json.loads(body)
        except RecursionError:
            raise BadInput(422, f"the JSON nests deeper than its parser allows; F's inputs nest {len(shape)} deep "
                                f"({len(shape) + 1} in a batch)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadInput(400, f"the body is not JSON ({exc.msg if hasattr(exc, 'msg') else exc}"
                                f"{f' at character {exc.pos}' if hasattr(exc, 'pos') else ''})") from None
        key = "inputs" if batch else "input"
        if isinstance(value, dict):
            if set(value) != {key}:
                raise BadInput(422, f"a JSON object body must hold only \"{key}\"; got keys {sorted(value)}")
            value = value[key]
        if batch:
            if not isinstance(value, list) or not value:
                raise BadInput(422, "a batch is a non-empty JSON array of inputs, or {\"inputs\": [...]}")
            items = [to_input(v, shape, f"input {i}") for i, v in enumerate(value)]
        else:
            items = [to_input(value, shape, "the input")]
    else:
        raise BadInput(415, f"Content-Type {kind!r} is not served; send application/json, application/octet-stream "
                            f"(raw float32, shape in X-Shape), application/x-npy, an image/*, or a multipart form "
                            f"with an image file")
    if not batch and len(items) != 1:
        raise BadInput(422, f"/predict takes one input, got {len(items)}; use /predict/batch")
    if len(items) > max_batch:
        raise BadInput(413, f"the batch holds {len(items)} inputs, more than {max_batch} (app.max_batch, and at most "
                            f"app.max_queue)")
    return items


# -- the app ------------------------------------------------------------------------------------------

def create_app(service: Service, dataset: str):
    """The ASGI app over ``service``; it starts ``service`` on its event loop at startup."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    app_cfg: AppConfig = service.app
    responses: dict = {}  # (path, status) -> count

    @contextlib.asynccontextmanager
    async def lifespan(_):
        service.start(asyncio.get_running_loop())
        yield
        service.stop()

    api = FastAPI(title="lcc prediction service", lifespan=lifespan,
                  description=f"Strategy '{service.strategy}' of a code with k={service.k}, r={service.r}.")

    async def failed(request: Request, exc: Exception):  # a bug of the service's own: logged, a JSON 500
        logging.getLogger("lcc.serve").error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return refuse(500, failure_reason(exc))

    api.add_exception_handler(Exception, failed)

    def refuse(status: int, reason: str, headers: Optional[dict] = None):
        return JSONResponse({"detail": reason}, status_code=status, headers=headers)

    retry_after = [(b"retry-after", str(app_cfg.retry_after_s).encode())]
    max_batch = min(app_cfg.max_batch, app_cfg.max_queue)

    async def answer(request, batch: bool) -> tuple[int, bytes, list]:
        """A POST /predict or /predict/batch: (status, JSON body, extra headers). Served by
        :class:`serve.web.hotpath.HotPath` without the framework, and by the routes below alike."""
        try:
            service.admit()  # a full queue refuses before the body is read or parsed: overload costs little
            body = await read_body(request, app_cfg.max_body_bytes)
            inputs = await parse_inputs(request, body, service.input_shape, dataset, batch, max_batch)
            answers = await service.predict(inputs)
        except BadInput as exc:
            return exc.status, orjson.dumps({"detail": exc.reason}), []
        except Overloaded as exc:
            return 503, orjson.dumps({"detail": f"overloaded: {exc}; retry after {app_cfg.retry_after_s} s"}), \
                retry_after
        except Unanswerable as exc:
            return 503, orjson.dumps({"detail": f"unavailable: {exc}"}), retry_after
        return 200, orjson.dumps({"answers": answers} if batch else answers[0]), []

    async def answered(request: Request, batch: bool):
        status, body, headers = await answer(request, batch)
        return Response(body, status_code=status, media_type="application/json",
                        headers={k.decode(): v.decode() for k, v in headers})

    @api.post("/predict")  # what the docs list; HotPath answers these POSTs before the framework sees them
    async def predict(request: Request):
        return await answered(request, batch=False)

    @api.post("/predict/batch")
    async def predict_batch(request: Request):
        return await answered(request, batch=True)

    @api.get("/health")
    async def health():
        ok = service.f_alive()
        body = {"status": "ok" if ok else "unavailable", "strategy": service.strategy, "k": service.k,
                "r": service.r, "instances": len(service.roles), "instances_alive": service.alive(),
                "queries_in_flight": len(service.futures), "input_shape": list(service.input_shape)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @api.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(service.metrics(), responses, service.strategy), media_type=PROMETHEUS)

    return HotPath(Counted(api, responses), answer, responses)


# -- building a service -----------------------------------------------------------------------------

def build_service(cfg: ServeConfig, app: AppConfig, loaded, pool) -> Service:
    """The service of ``app.policy`` (a ``policies`` row) or else ``app.strategy``'s fixed layout, on ``pool``'s
    actors for the trained code ``loaded``: the policy machine's driver of :mod:`serve.cluster.runtime`."""
    from serve.cluster.runtime import ServiceFrontend, service_roles

    code = loaded.code
    shape = tuple(loaded.splits.input_shape)
    with torch.no_grad():
        pad = code.base(torch.zeros(1, *shape))[0]
    policy = app_policy(cfg, app)
    k, r, _ = code_layout(code)
    actors = pool.actors_for(service_roles(app.strategy, cfg.instances, k, r, policy))
    return ServiceFrontend(cfg, app, code, actors, pad, shape,
                           classifier_output(pad.shape[-1], loaded.splits.num_classes), policy)


def start_pool(cfg: ServeConfig, app: AppConfig, loaded):
    """The actors of ``app.strategy`` (or ``app.policy``'s pool) alone: this front end's own, or the shared pool
    ``app.pool_name`` (attached where another front end on the same Ray cluster started them)."""
    from serve.cluster.runtime import Pool, service_roles

    code = loaded.code
    k, r, _ = code_layout(code)
    roles = service_roles(app.strategy, cfg.instances, k, r, app_policy(cfg, app))
    num_f, num_parity, num_backup = roles.count(ROLE_F), [roles.count(j) for j in range(r)], roles.count(ROLE_BACKUP)
    if not form_of(code).parity_models:  # F instances only: an N-worker code has no parity models
        num_parity = []
    return Pool(code, cfg, num_f, num_parity, loaded.backup, num_backup, name=app.pool_name)


def load_service_code(cfg: ServeConfig, app: AppConfig):
    """The served run's code (and the backup model of a strategy that needs one), checked before any work."""
    from coders.code import load_code

    loaded = load_code(cfg.runs[app.run], cfg.checkpoint, "cpu", cfg.data_dir)
    loaded.code = served_code(cfg, loaded.code, cfg.runs[app.run])  # with the config's 'perturb'
    loaded.backup = load_backup(cfg, loaded.splits) if strategy_of(app.strategy).needs_backup else None
    k, r, _ = code_layout(loaded.code)
    check_code_fits(loaded.code, [app.strategy], cfg.runs[app.run], "ray", "app.strategy" if app.policy is None
                    else "app.policy")
    check_failed_instances(cfg, k, r, [app.strategy], cfg.runs[app.run])
    policy = app_policy(cfg, app)
    if policy is not None and policy.pool == "shared" and getattr(loaded.code, "parity_models", None) is not None:
        raise ConfigError(f"Config key 'app.policy': row {app.policy!r} pools parities on F's instances, but run "
                          f"'{cfg.runs[app.run]}' sends its parities through parity models. Fix: serve a row with "
                          f"\"pool\": \"split\".")
    size = len(pool_roles(app.strategy, cfg.instances, k, r))
    if cfg.interference is not None and any(i >= size for i in cfg.interference["instances"]):
        raise ConfigError(f"Config key 'interference': instances {cfg.interference['instances']} are not all among "
                          f"the {size} instances of strategy '{app.strategy}' (0..{size - 1}).")
    return loaded


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"Config key 'app.port': cannot listen on {host}:{port} ({exc.strerror}). Fix: stop "
                              f"what holds it, or pick another with --set app.port=PORT.") from None


Stopped = Terminated  # SIGTERM before the server runs: stop as on Ctrl-C (serve.web.app.Stopped, as before)


def make_server(config):
    """uvicorn's server, remembering which signal stopped it (it shuts down gracefully on SIGINT and SIGTERM)."""
    import uvicorn

    class Server(uvicorn.Server):
        stopped_by: Optional[int] = None

        def handle_exit(self, sig, frame):
            self.stopped_by = self.stopped_by or sig
            super().handle_exit(sig, frame)

    return Server(config)


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    cfg = load_serve_config(*config_command(argv, "python -m serve.app", __doc__, "conf/serve/digits.json"))
    app = app_config(cfg)
    try:
        import fastapi  # noqa: F401
        import ray  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"The service needs FastAPI, uvicorn and Ray ({exc.name} is missing). Fix: pip install -e "
                        f"\".[serve]\".") from None
    loaded = load_service_code(cfg, app)
    check_port(app.host, app.port)
    from util.ray_cluster import start_ray, stop_ray

    signals.raising()  # from here a signal raises, so the clean-up below runs (start_ray defers it past ray.init)
    started, pool, service, why = False, None, None, None
    try:
        try:
            started = start_ray(cfg.address, cfg.num_cpus)
        except Exception as exc:  # Ray's start-up timeout is a bare Exception
            if isinstance(exc, UserError):
                raise
            raise UserError(f"Ray did not start ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). "
                            f"Fix: retry when the machine is less busy, or join a running cluster with "
                            f"--set address=HOST:PORT.") from None
        with signals.deferred():  # actors starting: a signal is raised once they have
            pool = start_pool(cfg, app, loaded)
            service = build_service(cfg, app, loaded, pool)
        busy = []
        if cfg.interference:  # on the instances this front end started (a shared pool's others have theirs)
            busy = [a for a in (service.core.actors[i] for i in cfg.interference["instances"]) if a in pool.started]
            ray.get([a.start_interference.remote(cfg.interference["processes"]) for a in busy])
        server = make_server(server_config(create_app(service, loaded.splits.name), app.host, app.port,
                                           log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                                           proxy_headers=False))  # the service reads no client address
        shared = (f" of pool '{app.pool_name}' ({pool.attached} attached, {len(pool.started)} started here)"
                  if app.pool_name else "")
        k, r, need = code_layout(loaded.code)
        shape = form_of(loaded.code).shape(k, r, need)
        print(f"serving {cfg.runs[app.run]} ({shape}), strategy {app.strategy} on "
              f"{len(service.roles)} instances{shared}, at http://{app.host}:{app.port} (Ctrl-C stops)", flush=True)
        # uvicorn shuts down gracefully on SIGINT or SIGTERM, then raises that signal again: to a
        # handler that only notes it, so the clean-up below runs either way.
        signal.signal(signal.SIGINT, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: None)
        server.run()
        why = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(server.stopped_by)
    except KeyboardInterrupt:
        why = "Ctrl-C"
    except Terminated:
        why = "SIGTERM"
    finally:
        with signals.ignored():  # a second Ctrl-C must not cut the clean-up short
            if pool is not None:
                with contextlib.suppress(Exception):
                    pool.shutdown()
            if started:
                stop_ray()
    if service is None:
        print(f"stopped by {why or 'request'} while starting: nothing was served"
              f"{'; instances and Ray shut down' if started else ''}", file=sys.stderr)
    else:
        print(f"stopped by {why or 'request'}: {service.counts['answered']} queries answered; "
              f"instances{' and Ray' if started else ''} shut down", file=sys.stderr)
    return 130 if why == "Ctrl-C" else 143 if why == "SIGTERM" else 0


if __name__ == "__main__":
    sys.exit(main())
