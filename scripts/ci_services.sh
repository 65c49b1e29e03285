#!/usr/bin/env bash
# What the orchestration tests need beyond the Python stack, installed in CI only (CI=true):
# Debian's headless Chromium and its driver, for tests/flows/test_browser.py (Selenium drives them).
# The Prefect and MLflow servers themselves are started by the tests (tests/helpers/server_fixtures.py:
# their own servers, and scripts/serve.sh itself). Locally this does nothing; the browser tests skip
# with the reason if chromium is missing (apt-get install -y chromium chromium-driver).
set -euo pipefail
[ "${CI:-}" = "true" ] || exit 0
if command -v chromium > /dev/null && command -v chromedriver > /dev/null; then
  exit 0
fi
sudo_cmd=()
[ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
"${sudo_cmd[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver
