"""Ray Train: one run per training job through the config's stages, K folds with OOF thresholds, lr-find, F2.

train.py is the driver (start reading there); worker.py the loop on each Ray Train worker, one method a step;
steps.py one epoch's training and validation; run_folder.py what the driver writes from Ray's checkpoints;
folds.py K folds side by side.
"""

from planet_batch.errors import PlanetBatchError


class TrainError(PlanetBatchError, RuntimeError):
    pass
