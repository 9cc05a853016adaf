#!/usr/bin/env bash
# Run one benchmark alternately on two checkouts (e.g. main and a `git worktree` of an older
# commit), so a comparison sees the same noise on both sides. Run as root from anywhere:
#   tests/bench/side_by_side.sh /tmp/before /work/main 3 tests/bench/bench_dataplane.py --sizes 100000
set -u
before="$1"; after="$2"; rounds="$3"; shift 3
python="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python"
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    root="$before"; [ "$side" = after ] && root="$after"
    echo "=== round $round: $side ($root)"
    (cd "$root" && timeout 900 "$python" "$@") 2>&1 | tail -25
  done
done
