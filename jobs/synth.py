"""spark-submit entry point: generate a synthetic survey.

    spark-submit jobs/synth.py --config conf/local.yaml [--stars N] [--set KEY=VALUE ...]

Thin by design: argument parsing, config and the session factory are the
library's (``stellar.cli``); the work is ``stellar.synth``.
"""

import sys

from stellar.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
