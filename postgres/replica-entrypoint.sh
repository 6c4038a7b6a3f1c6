#!/bin/bash
# Streaming read replica: on first start, clone the primary with pg_basebackup (it writes the standby
# settings, -R), then run PostgreSQL as a hot standby with the same postgresql.conf as the primary.
# Searches go here through pgbouncer's campus_search_ro database (DATABASE_READ_URL).
set -euo pipefail

: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD is required}"
PRIMARY_HOST="${PRIMARY_HOST:-primary}"
REPLICATION_SLOT="${REPLICATION_SLOT:-replica1}"
PGDATA="${PGDATA:-/var/lib/postgresql/18/docker}"
export PGPASSWORD="$REPLICATION_PASSWORD"

mkdir -p "$PGDATA"
chown -R postgres:postgres "$(dirname "$PGDATA")"
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_isready --host "$PRIMARY_HOST" --username replicator --dbname postgres --quiet; do
        echo "waiting for the primary at $PRIMARY_HOST ..."
        sleep 2
    done
    gosu postgres pg_basebackup --host "$PRIMARY_HOST" --username replicator --pgdata "$PGDATA" \
        --wal-method=stream --write-recovery-conf --slot "$REPLICATION_SLOT" --checkpoint=fast --progress
fi

exec gosu postgres postgres -D "$PGDATA" -c config_file=/etc/postgresql/postgresql.conf
