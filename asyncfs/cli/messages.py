"""User-facing error lines: whatever a name holds, an error stays on one line."""


def one_line(message: str) -> str:
    """A message fit for one line: newlines and other control characters are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
