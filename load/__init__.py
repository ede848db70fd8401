"""Load generation and benchmarks for rollout-proxy (`make bench`)."""
