"""The Ray runtime: model instances as actors (pool), the answering core (dispatch), the frontends (runtime)."""
