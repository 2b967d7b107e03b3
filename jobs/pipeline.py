"""spark-submit entry point: `stellar pipeline` (see `stellar pipeline --help`).

    spark-submit jobs/pipeline.py --config conf/cluster.yaml [--from STAGE] [--only STAGES] [--set KEY=VALUE ...]

The full-catalogue rerun: every stage in one application, each skipped when its committed output
already matches its inputs and settings, each resuming its own finished tasks after a kill.
"""

import sys

from stellar.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
