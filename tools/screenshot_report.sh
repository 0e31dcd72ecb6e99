#!/usr/bin/env bash
# Render OUT_DIR/report.html in headless Chromium and save a PNG (outside the repo by default).
#   tools/screenshot_report.sh runs/grape [/tmp/report.png]
# Needs Debian's chromium (apt-get install chromium).
set -euo pipefail
out_dir=${1:?usage: $0 OUT_DIR [PNG]}
png=${2:-/tmp/curate-report.png}
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size=1200,2400 --hide-scrollbars \
  --screenshot="$png" "file://$(cd "$out_dir" && pwd)/report.html" 2>/dev/null
rm -rf "$profile"
echo "$png"
