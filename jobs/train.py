"""spark-submit entry point: train the deep ensemble (one member per Spark task) and register it in MLflow.

    spark-submit jobs/train.py --config conf/local.yaml [--model hybrid] [--members 5] [--set KEY=VALUE ...]

Thin by design: the CLI parses arguments and builds the session; the work is ``stellar.train``.
"""

import sys

from stellar.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
