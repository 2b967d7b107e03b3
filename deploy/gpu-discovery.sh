#!/usr/bin/env bash
# Spark GPU discovery script (spark.executor.resource.gpu.discoveryScript, and
# spark.worker.resource.gpu.discoveryScript on standalone workers): prints the node's GPUs as
#   {"name": "gpu", "addresses": ["0", "1", ...]}
# Spark then hands each task its share in TaskContext.resources()["gpu"], which stellar's
# device choice reads (stellar/devices.py).
set -euo pipefail
if command -v nvidia-smi >/dev/null 2>&1; then
  ids=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed 's/ //g' | paste -sd, - | sed 's/,/","/g')
else
  ids=""
fi
if [ -n "$ids" ]; then echo "{\"name\": \"gpu\", \"addresses\": [\"$ids\"]}"; else echo '{"name": "gpu", "addresses": []}'; fi
