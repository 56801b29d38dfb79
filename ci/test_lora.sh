#!/usr/bin/env bash
# Output-match check of the export spine (the analogue of ExecuTorch's .ci/scripts/test_lora.sh).
#
# For each quantization mode in $QMODES (default: "none 8da4w") it exports a tiny 2-layer model
# twice -- base only, and base + two adapters -- then checks on the ExecuTorch runtime:
#   * each program's logits against the eager model it came from (stated tolerance) and the
#     greedy tokens' agreement; adapter programs' logits differ from base (adapter applied);
#   * the two exports' foundation.ptd files are byte-identical;
#   * every adapter program loads and runs with the base-only export's foundation.ptd.
# Exit status is non-zero on any failure. Needs edgelora installed (see README).
set -euo pipefail

PYTHON="${PYTHON:-python}"
QMODES="${QMODES:-none 8da4w}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/edgelora-test-lora.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m edgelora.ci.make_fixtures "$WORK"
fail=0
for qmode in $QMODES; do
  echo "== qmode $qmode"
  "$PYTHON" -m edgelora.export.cli --params "$WORK/params.json" --qmode "$qmode" \
      --output-dir "$WORK/$qmode-base" > "$WORK/$qmode-base.log" 2>&1 \
      || { cat "$WORK/$qmode-base.log"; exit 1; }
  "$PYTHON" -m edgelora.export.cli --params "$WORK/params.json" --qmode "$qmode" \
      --lora "a=$WORK/adapter_a" --lora "b=$WORK/adapter_b" \
      --output-dir "$WORK/$qmode-lora" > "$WORK/$qmode-lora.log" 2>&1 \
      || { cat "$WORK/$qmode-lora.log"; exit 1; }
  "$PYTHON" -m edgelora.ci.output_match "$WORK/$qmode-lora" \
      --base-export "$WORK/$qmode-base" 2>/dev/null || fail=1
done
if [ "$fail" -ne 0 ]; then
  echo "test_lora: FAILED"
  exit 1
fi
echo "test_lora: all checks passed"
