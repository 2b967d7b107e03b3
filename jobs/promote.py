"""spark-submit entry point: `stellar promote` (see `stellar promote --help`).

    spark-submit jobs/promote.py --config conf/local.yaml [options] [--set KEY=VALUE ...]

Thin by design: the CLI parses arguments and builds the session; the work is ``stellar.promote``.
"""

import sys

from stellar.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
