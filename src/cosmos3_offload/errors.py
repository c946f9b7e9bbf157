"""The one exception type for bad user input; the CLI turns it into exit status 2."""


class InputError(ValueError):
    """A request that cannot run as given; the message says how to fix it."""
