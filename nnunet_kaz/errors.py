"""The one exception type the CLI turns into a clear message and a non-zero exit code."""


class KazError(Exception):
    """Bad input or a failed precondition the user can fix; the message names what is wrong.

    `option`: the library parameter at fault (e.g. "pred_subset"). Library messages never spell CLI flags;
    they may name the parameter in parentheses, which `nnunet-kaz` replaces by its flag (or appends the flag)."""

    def __init__(self, message: str = "", option: str | None = None):
        super().__init__(message)
        self.option = option
