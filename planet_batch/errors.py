"""The base of every error planet-batch raises for bad input or setup.

The CLI turns these into one clear line and exit status 2; anything else is a bug and keeps its traceback.
"""


class PlanetBatchError(Exception):
    pass


def first_line(e: BaseException) -> str:
    """An exception's first non-empty line, for one-line messages (its type's name for an empty message)."""
    lines = [s for s in str(e).splitlines() if s.strip()]
    return lines[0].strip() if lines else type(e).__name__
