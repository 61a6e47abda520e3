"""Ray Data scoring into resumable Parquet shards, and their assembly into the submission with bounded memory.

score.py runs the pipeline (start reading there); predictor.py is the model side (the ensemble and its actor);
shards.py the work folder a rerun resumes from; assemble.py the submission's order in bounded memory.
"""

from planet_batch.errors import PlanetBatchError


class ScoreError(PlanetBatchError, RuntimeError):
    pass


ID_COLUMN = "path"  # a scored row's id: its image's path (Ray Data's checkpoint id column, shards.py)
