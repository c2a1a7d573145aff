"""The one exception type the library raises for problems a user can fix (bad input, config, files)."""


class LLMError(Exception):
    """A problem with the user's input, config or files; its message says what is wrong and how to fix it.

    Entry points (CLI, stages) print it as a single line and exit non-zero instead of showing a traceback.
    """
