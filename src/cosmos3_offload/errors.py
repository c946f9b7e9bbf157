"""The one exception type for bad user input; the CLI turns it into exit status 2."""


class InputError(ValueError):
    """A request that cannot run as given; the message says how to fix it."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to one short line, for an InputError that wraps it."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
