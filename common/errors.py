"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A bad request from the user: printed as one line, exit code 2, never a traceback."""
