"""The exceptions that end a run on purpose: a bad request from the user, or a SIGTERM from outside."""


class UserError(Exception):
    """A bad request from the user: printed as one line, exit code 2, never a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (timeout, docker stop, CI cancel): handled like Ctrl-C, a partial report, then exit 143."""


def first_line(error: BaseException) -> str:
    """An exception as one short line, for skip reasons and printed errors."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
