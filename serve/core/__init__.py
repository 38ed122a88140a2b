"""What every serving engine shares: the config, the plan, the policy machine, batching, limits and results."""
