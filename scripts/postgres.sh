#!/usr/bin/env bash
# A local PostgreSQL for the event store's tests: install it from Debian's packages when it is
# absent, start the newest cluster, create a role and a database, and print their URI on stdout
# (progress goes to stderr). Idempotent: a second run finds everything in place and only prints.
#
#   export AFFINITY_TEST_POSTGRES_URI="$(bash scripts/postgres.sh)"
#
# Needs root (or password-less sudo) for apt-get and the cluster; CI's Debian machine has no
# internet but has Debian's package mirror.
set -euo pipefail

ROLE="${AFFINITY_PG_ROLE:-affinity_test}"
PASSWORD="${AFFINITY_PG_PASSWORD:-affinity_test}"
DATABASE="${AFFINITY_PG_DATABASE:-affinity_test}"

say() { echo "postgres.sh: $*" >&2; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}
as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -n -u postgres "$@"; fi
}

if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
    say "PostgreSQL is not installed: apt-get install postgresql"
    export DEBIAN_FRONTEND=noninteractive
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2; then
        say "refreshing the package lists and retrying"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
    fi
fi
VERSION="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"

cluster() { pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $'"$1"'}'; }
if [ -z "$(cluster 2)" ]; then
    say "creating cluster $VERSION/main"
    as_root pg_createcluster "$VERSION" main >&2
fi
if [ "$(cluster 4)" != "online" ]; then
    say "starting cluster $VERSION/main"
    as_root pg_ctlcluster "$VERSION" main start >&2
else
    say "cluster $VERSION/main is already running"
fi
PORT="$(cluster 3)"

psql_admin() { as_postgres psql -p "$PORT" -X -q -v ON_ERROR_STOP=1 -tA "$@"; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != "1" ]; then
    say "creating role $ROLE"
    psql_admin -c "CREATE ROLE \"$ROLE\" LOGIN PASSWORD '$PASSWORD'"
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" != "1" ]; then
    say "creating database $DATABASE owned by $ROLE"
    psql_admin -c "CREATE DATABASE \"$DATABASE\" OWNER \"$ROLE\""
fi
# The tests connect over TCP with the password, as a deployment would.
PGPASSWORD="$PASSWORD" psql -h 127.0.0.1 -p "$PORT" -U "$ROLE" -d "$DATABASE" -X -q -tA \
    -c "SELECT 1" >/dev/null
say "PostgreSQL $VERSION ready on 127.0.0.1:$PORT, database $DATABASE, role $ROLE"
echo "postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"
