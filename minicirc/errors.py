"""One exception type for every bad input minicirc detects, so callers (and the CLI) can tell a user
mistake from a bug. Messages name the problem and, where there is one, the offending file or value."""


class MinicircError(ValueError):
    pass
