"""The one error type users see."""


class ElastiLMError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback; the service answers it
    as a 400 with the message."""
