#!/usr/bin/env bash
# Re-make the README's screenshots (docs/screenshots/*.png) from the current pages: the browser
# tests write them only when BATCHSCOPE_SCREENSHOTS=1, so an ordinary test run leaves git clean.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCHSCOPE_SCREENSHOTS=1 python -m pytest -q -p no:cacheprovider -m browser tests/test_dashboard_browser.py "$@"
git status --short docs/screenshots
