"""spark-submit entry point: Gaia archive files and label catalogues to partitioned Parquet.

    spark-submit jobs/ingest.py --config conf/local.yaml [--gaia-root DIR] [--datalink PATH ...] [--set KEY=VALUE ...]

Thin by design: the CLI parses arguments and builds the session; the work is ``stellar.ingest``.
"""

import sys

from stellar.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
