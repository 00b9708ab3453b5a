"""cronsul's benchmark suite: `make bench` (python -m bench.run). See docs/benchmarks.md."""
