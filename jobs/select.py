"""spark-submit entry point: training-sample selection map (t-SNE/UMAP) and train-like flags.

    spark-submit jobs/select.py --config conf/local.yaml [--set KEY=VALUE ...]

Thin by design: the CLI parses arguments and builds the session; the work is ``stellar.selection``.
"""

import sys

from stellar.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
