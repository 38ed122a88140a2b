"""The config-driven trainer: config schema, scenarios, losses, loop, metrics, checkpoints."""
