"""spark-submit entry point: `stellar predict` (see `stellar predict --help`).

    spark-submit jobs/predict.py --config conf/local.yaml [options] [--set KEY=VALUE ...]

Thin by design: the CLI parses arguments and builds the session; the work is ``stellar.predict``.
"""

import sys

from stellar.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
