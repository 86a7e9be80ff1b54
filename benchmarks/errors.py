"""The one error type of the benchmarks package."""


class BenchError(RuntimeError):
    """A benchmark, trial or broker launch could not run; the message says why and what to do."""
