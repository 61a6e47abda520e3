"""Ray Job entrypoint: the whole lesson-3 notebook (train, export, score, submission.csv, optional submit).

    python jobs/lesson3.py --data DATA --out runs/lesson3 [--config jobs/configs/lesson3.yaml] [--submit -m MSG]
    ray job submit --working-dir . -- python jobs/lesson3.py --data s3://BUCKET/planet --out /home/ubuntu/runs/l3
"""

import sys

from planet_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["lesson3", *sys.argv[1:]]))
