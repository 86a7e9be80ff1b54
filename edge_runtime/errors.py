"""The one error type of the aggregator."""


class AggregatorError(RuntimeError):
    """The aggregator cannot do what it was asked (bad config, model mismatch, broker refused...)."""
