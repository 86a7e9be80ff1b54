"""The one error type of the benchmarks package."""


class BenchError(RuntimeError):
    """A benchmark could not run; the message says why and what to do. (Trials raise
    ``trials.errors.TrialError``, the test bed ``testbed.errors.TestbedError``.)"""
