"""User-facing errors: the CLI prints these as one line, without a traceback."""


class LMForgeError(Exception):
    """A problem with the user's input (file, model name, prompt, option), not a bug."""
