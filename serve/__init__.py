"""Serving trained codes: a Ray runtime with injected stragglers, and a simulator (``python -m serve``).

The package has four rooms and a door:

* ``serve/core/`` -- what every engine shares: the config, the plan, the policy machine, batching, limits, results;
* ``serve/cluster/`` -- the Ray runtime: the actors (pool), the answering core (dispatch), the frontends;
* ``serve/simulator/`` -- the discrete-event simulator, its profiles and predictions, and the map;
* ``serve/web/`` -- the HTTP service, its edge, bodies, metrics, bookkeeping and load generator;
* the door: ``python -m serve`` (cli.py) and ``python -m serve.report``.

The flat module names of earlier versions (``serve.policy``, ``python -m serve.app``, ``python -m serve.map``,
``python -m serve.loadgen``, ...) still import and run: each is the module in its room under a second name.
"""
from util.moved import keep_moved_names

keep_moved_names(__name__, {
    "config": "serve.core.config", "plan": "serve.core.plan", "policy": "serve.core.policy",
    "results": "serve.core.results", "limits": "serve.core.limits", "batching": "serve.core.batching",
    "runtime": "serve.cluster.runtime", "dispatch": "serve.cluster.dispatch", "pool": "serve.cluster.pool",
    "sim": "serve.simulator.simulate", "sim_events": "serve.simulator.events",
    "sim_profile": "serve.simulator.profiles", "sim_predict": "serve.simulator.predictions",
    "map": "serve.simulator.map",
    "app": "serve.web.app", "edge": "serve.web.edge", "bodies": "serve.web.bodies",
    "exposition": "serve.web.exposition", "online": "serve.web.online", "loadgen": "serve.web.loadgen",
})
