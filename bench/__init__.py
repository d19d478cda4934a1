"""Benchmarks (`make bench` runs them all through bench.run_all); results in bench/results, notes in BENCHMARKS.md."""
