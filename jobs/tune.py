"""Ray Job entrypoint: Ray Tune over a search space around a training config; the results and the best config.

    python jobs/tune.py --config jobs/configs/lesson3-lite0.yaml --space jobs/configs/search-lite.yaml \
        --data DATA --out SEARCH_DIR
    ray job submit --working-dir . -- python jobs/tune.py --config ... --space ... --data ... --out ...
"""

import sys

from planet_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
