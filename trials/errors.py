"""The one error type of the field-trial package."""


class TrialError(RuntimeError):
    """A field trial or its report could not run; the message says why and what to do."""
