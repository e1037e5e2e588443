#!/bin/sh
# The web view's screenshots in docs/screenshots/ (docs/web.md shows them): the job list, a
# failed job, a live job and the agents page, at 1280 and 390 px wide, light and dark, as
# tests/web.rs's a_jobs_page_and_every_page_accessible takes them (Chromium and chromedriver:
# apt-get install chromium chromium-driver). Run as root, as the test suite's browser tests.
set -eu
cd "$(dirname "$0")/.."
MISTRY_TEST_ARTIFACTS="$PWD/docs/screenshots" \
    cargo test -p mistry --test web a_jobs_page_and_every_page_accessible -- --exact
