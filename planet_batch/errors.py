"""The base of every error planet-batch raises for bad input or setup.

The CLI turns these into one clear line and exit status 2; anything else is a bug and keeps its traceback.
"""


class PlanetBatchError(Exception):
    pass
