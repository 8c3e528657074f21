"""One exception type for every bad input minicirc detects, so callers (and the CLI) can tell a user
mistake from a bug. Messages name the problem and, where there is one, the offending file or value."""

import json


class MinicircError(ValueError):
    pass


def read_json(path):
    """A JSON file's content; a file that is not valid JSON is a MinicircError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise MinicircError(f"{path}: not valid JSON ({e})") from None
