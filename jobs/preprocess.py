"""spark-submit entry point: ingested tables -> model-ready features (and normalisation statistics).

    spark-submit jobs/preprocess.py --config conf/local.yaml [--set KEY=VALUE ...]

Thin by design: the CLI parses arguments and builds the session; the work is ``stellar.preprocess``.
"""

import sys

from stellar.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
