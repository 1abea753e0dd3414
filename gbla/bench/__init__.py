"""GPU speed benchmarks (python -m gbla.bench.layer_speed)."""
