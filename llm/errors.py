"""The library's exceptions: `LLMError` for problems a user can fix, `Interrupted` for a run stopped by a signal."""


class LLMError(Exception):
    """A problem with the user's input, config or files; its message says what is wrong and how to fix it.

    Entry points (CLI, stages) print it as a single line and exit non-zero instead of showing a traceback.
    """


class Interrupted(LLMError):
    """The run was stopped by a signal (SIGINT/SIGTERM); `signum` names it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
