"""Ray Job entrypoint: the whole lesson-3 notebook (train, export, score, submission.csv, optional submit).

    python jobs/lesson3.py --data DATA --out runs/lesson3 [--config jobs/configs/lesson3.yaml] [--submit -m MSG]
    ray job submit --working-dir . -- python jobs/lesson3.py --data /mnt/shared/planet --out /mnt/shared/runs/l3
"""

import argparse
import sys

from planet_batch.config import TrainConfig, load_config
from planet_batch.lesson3 import run_lesson3
from planet_batch.runtime import setup_logging


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/lesson3.yaml")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threshold", default="0.2", help="0.2 (the notebook's) or 'tuned'")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--submit", action="store_true", help="submit submission.csv to the competition")
    p.add_argument("-m", "--message", default="planet-batch lesson3")
    args = p.parse_args()
    setup_logging()
    result = run_lesson3(load_config(TrainConfig, args.config, args.set), args.data, args.out, args.threshold,
                         args.tta, args.message if args.submit else None)
    print(f"export: {result.export}\nsubmission: {result.submission.output}" +
          ("\nsubmitted to Kaggle" if result.submitted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
