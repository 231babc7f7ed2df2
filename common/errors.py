"""The exceptions that end a run on purpose: a bad request from the user, or a SIGTERM from outside."""


class UserError(Exception):
    """A bad request from the user: printed as one line, exit code 2, never a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (timeout, docker stop, CI cancel): handled like Ctrl-C, a partial report, then exit 143."""

    reason = "terminated (SIGTERM)"
    exit_code = 143


class OutputClosed(KeyboardInterrupt):
    """Whoever read stdout went away (`| head`, quitting `less`): handled like Ctrl-C, a partial report, then exit 141
    (128 + SIGPIPE, what a shell reports for a process a closed pipe ended)."""

    reason = "stopped: its output was closed (a pipe into head or less)"
    exit_code = 128 + 13  # SIGPIPE is 13 on Linux and macOS; Windows has no SIGPIPE, so the number is written out


def first_line(error: BaseException) -> str:
    """An exception as one short line, for skip reasons and printed errors."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
