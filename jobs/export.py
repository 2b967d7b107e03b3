"""spark-submit entry point: `stellar export` (see `stellar export --help`).

    spark-submit jobs/export.py --config conf/local.yaml [options] [--set KEY=VALUE ...]

Thin by design: the CLI parses arguments and builds the session; the work is ``stellar.export``.
"""

import sys

from stellar.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
