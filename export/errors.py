"""The one error type of export/: a message a user can act on."""


class ExportError(Exception):
    pass
