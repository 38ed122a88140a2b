"""What ``GET /metrics`` shows, in Prometheus' text format, and the ASGI wrapper counting the responses it lists.

Part of the HTTP service (serve/web/app.py, which still exports ``prometheus_text``).
"""

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class Counted:
    """The service's ASGI app, counting every response by (path, status) for /metrics.

    A plain ASGI wrapper rather than an ``@app.middleware("http")`` function: Starlette runs those through a
    task and a stream per request, which cost more CPU than the rest of a /predict (measured in
    bench/throughput.py's HTTP rows). A failure Starlette has already answered with a 500 (the app's
    exception handler) is counted and not raised again, so it is logged once.
    """

    def __init__(self, app, responses: dict):
        self.app, self.responses = app, responses

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:  # answered (500) and logged by the exception handler already
            pass
        key = (scope["path"], status)
        self.responses[key] = self.responses.get(key, 0) + 1


def prometheus_text(m: dict, responses: dict, strategy: str) -> str:
    """The metrics in Prometheus' text exposition format (counters, gauges, and a latency summary)."""
    label = f'strategy="{strategy}"'
    lines = []

    def metric(name: str, kind: str, doc: str, samples):
        lines.append(f"# HELP lcc_{name} {doc}")
        lines.append(f"# TYPE lcc_{name} {kind}")
        for labels, value in samples:
            lines.append(f"lcc_{name}{{{labels}}} {value:.9g}" if isinstance(value, float)
                         else f"lcc_{name}{{{labels}}} {value}")

    metric("http_responses_total", "counter", "HTTP responses by path and status code.",
           [(f'path="{p}",code="{c}"', n) for (p, c), n in sorted(responses.items())])
    metric("http_server_errors_total", "counter", "HTTP responses with a 5xx status other than 503 (overload, "
           "no live F): the service's own failures.", [(label, sum(n for (_, c), n in responses.items()
                                                               if c >= 500 and c != 503))])
    for name, doc in (("queries_answered_total", "Queries answered (each exactly once)."),
                      ("queries_rebuilt_total", "Queries answered by the decoder (or the backup model)."),
                      ("queries_retried_total", "Queries sent again after their instance died."),
                      ("queries_rejected_total", "Queries refused with 503 because the queue was full."),
                      ("queries_unanswerable_total", "Queries lost because no instance holding F was alive."),
                      ("instance_requests_total", "Requests sent to model instances (F, parity, backup).")):
        metric(name, "counter", doc, [(label, m[name])])
    for name, doc in (("queries_in_flight", "Queries admitted and not yet answered."),
                      ("instances", "Model instances of the strategy."),
                      ("instances_alive", "Model instances not failed."),
                      ("rebuilt_fraction", "Fraction of answered queries the decoder rebuilt, since start.")):
        metric(name, "gauge", doc, [(label, m[name])])
    metric("frontend_seconds_total", "counter", "Seconds the frontend spent encoding, dispatching and decoding.",
           [(f'{label},stage="{k}"', float(v)) for k, v in m["frontend_seconds"].items()])
    lines.append("# HELP lcc_latency_seconds Server-measured latency per query (admission to answer), since start.")
    lines.append("# TYPE lcc_latency_seconds summary")
    for q, v in m["latency_quantiles"].items():
        lines.append(f'lcc_latency_seconds{{{label},quantile="{q:g}"}} {v:.9g}')
    lines.append(f"lcc_latency_seconds_sum{{{label}}} {m['latency_seconds_sum']:.9g}")
    lines.append(f"lcc_latency_seconds_count{{{label}}} {m['latency_seconds_count']}")
    return "\n".join(lines) + "\n"
