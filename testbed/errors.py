"""The one error type of the test bed package."""


class TestbedError(RuntimeError):
    """A broker, aggregator process or test model could not start; the message says why and what to do."""

    __test__ = False  # a test module importing it must not make pytest try to collect it
