#!/usr/bin/env bash
# A Java runtime for the Spark engine (pyspark 4 needs Java 17 or newer): install Debian's
# OpenJDK 17 when no suitable java is on the PATH. Idempotent; progress goes to stderr.
# Needs root (or password-less sudo) for apt-get.
set -euo pipefail

say() { echo "java.sh: $*" >&2; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}
major() { java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]; exit}'; }

if command -v java >/dev/null && [ "$(major)" -ge 17 ] 2>/dev/null; then
    say "found Java $(major)"
    exit 0
fi
say "no Java 17+: apt-get install openjdk-17-jre-headless"
if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openjdk-17-jre-headless >&2; then
    say "refreshing the package lists and retrying"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openjdk-17-jre-headless >&2
fi
say "installed Java $(major)"
