"""spark-submit entry point: `stellar report` (see `stellar report --help`).

    spark-submit jobs/report.py --config conf/local.yaml [--output DIR] [--no-mlflow] [--force] [--set KEY=VALUE ...]

Thin by design: the CLI parses arguments; the work is ``stellar.report``.
"""

import sys

from stellar.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
