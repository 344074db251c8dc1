"""The one exception type users see as a single ``error: ...`` line."""


class PipelineError(Exception):
    """Bad input or environment: the message names the file, key or URL at fault.

    Entry points print it as one line and exit non-zero; nothing below them
    prints tracebacks for it, because the user can act on the message alone.
    """
