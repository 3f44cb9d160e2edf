"""The one exception type that means "the user gave us something we cannot use"."""


class DriftloopError(Exception):
    """A problem with the user's input or environment, reported as one clear line (exit code 2).

    Anything else that escapes is a bug and keeps its traceback.
    """
