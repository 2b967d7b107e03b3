"""spark-submit entry point: training-sample selection map (t-SNE/UMAP) and train-like flags.

Named selection.py: a jobs/select.py would shadow the standard library's ``select``
module for every job in this folder (the script's folder comes first on sys.path).

    spark-submit jobs/selection.py --config conf/local.yaml [--set KEY=VALUE ...]

Thin by design: the CLI parses arguments and builds the session; the work is ``stellar.selection``.
"""

import sys

from stellar.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
