"""fastrdrop benchmarks: ``python -m benchmarks`` (the runner) and ``pytest benchmarks``."""
