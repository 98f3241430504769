"""GPU benchmarks of the engine (`python -m benchmarks.<name>`); results go to docs/PERF.md."""
