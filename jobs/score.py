"""Ray Job entrypoint: score test images into a Kaggle submission.

    python jobs/score.py --model RUN_DIR/export --data DATA --out submission.csv
    ray job submit --working-dir . -- python jobs/score.py --model ... --data ... --out ...
"""

import sys

from planet_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
