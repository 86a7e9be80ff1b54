"""The one error type of train/: a message a user can act on (bad config, bad checkpoint, bad data)."""


class TrainError(Exception):
    pass
