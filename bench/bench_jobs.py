"""Python callables the benchmark runs as cronsul jobs (`callable = "bench.bench_jobs:noop"`)."""


def noop() -> None:
    """The no-op job every peer runs too."""
