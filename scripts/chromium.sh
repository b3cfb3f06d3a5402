#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the console's browser tests (tests/console): install
# Debian's chromium and chromium-driver when either is missing. Idempotent; progress goes to
# stderr. Needs root (or password-less sudo) for apt-get.
set -euo pipefail

say() { echo "chromium.sh: $*" >&2; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}
found() { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }

if found; then
    say "found $(chromium --version 2>/dev/null || echo chromium) and chromedriver"
    exit 0
fi
say "no chromium/chromedriver: apt-get install chromium chromium-driver"
install() {
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        chromium chromium-driver >&2
}
if ! install; then
    say "refreshing the package lists and retrying"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    install
fi
found || { say "chromium or chromedriver still missing after the install"; exit 1; }
say "installed $(chromium --version 2>/dev/null || echo chromium)"
