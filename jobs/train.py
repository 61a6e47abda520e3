"""Ray Job entrypoint: train a config's stages and export the model.

    python jobs/train.py --config jobs/configs/lesson3.yaml --data DATA --out RUN_DIR
    ray job submit --working-dir . -- python jobs/train.py --config ... --data ... --out ...
"""

import sys

from planet_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
