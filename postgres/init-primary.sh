#!/bin/bash
# Runs once, when the primary's data directory is created (docker-entrypoint-initdb.d). Creates the
# application role and database, the replication role and the replica's slot, and the extensions, so the
# application itself never needs superuser rights. Passwords come from the environment, never the repo.
# No statement timeout on the role: the app sets one per search transaction (SET LOCAL, DB_STATEMENT_TIMEOUT_MS),
# and migrations at start-up must run to the end however large the database.
set -euo pipefail

: "${APP_DB_PASSWORD:?APP_DB_PASSWORD is required}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD is required}"
APP_DB_USER="${APP_DB_USER:-campus_search}"
APP_DB_NAME="${APP_DB_NAME:-campus_search}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v app_user="$APP_DB_USER" -v app_db="$APP_DB_NAME" -v app_password="$APP_DB_PASSWORD" \
     -v repl_password="$REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE :"app_user" LOGIN PASSWORD :'app_password';
ALTER ROLE :"app_user" SET idle_in_transaction_session_timeout = '60s';
CREATE DATABASE :"app_db" OWNER :"app_user";
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'repl_password';
SELECT pg_create_physical_replication_slot('replica1');
\connect :"app_db"
CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
SQL

# Streaming replication connections from the private network, password-checked.
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
