"""The exceptions that end a run on purpose: a bad request from the user, or a SIGTERM from outside."""


class UserError(Exception):
    """A bad request from the user: printed as one line, exit code 2, never a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (timeout, docker stop, CI cancel): handled like Ctrl-C, a partial report, then exit 143."""
