"""The one error type of the node firmware."""


class NodeError(RuntimeError):
    """The node cannot do what it was asked (broker unreachable, bad configuration, ...)."""
