"""The HTTP prediction service: the app, its edge guards, binary bodies, /metrics, bookkeeping, the load generator."""
