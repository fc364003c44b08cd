"""The one exception type the CLI turns into a clear message and a non-zero exit code."""


class KazError(Exception):
    """Bad input or a failed precondition the user can fix; the message names what is wrong."""
