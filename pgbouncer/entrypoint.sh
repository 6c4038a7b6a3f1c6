#!/bin/sh
# Writes pgbouncer's auth file from the environment (no password in the repository or the image), then
# runs pgbouncer in the foreground.
set -eu
umask 077
mkdir -p /tmp/pgbouncer
user="${APP_DB_USER:-campus_search}"
# pgbouncer's auth file quotes with "; a " inside a value is written twice.
password=$(printf '%s' "${APP_DB_PASSWORD:?APP_DB_PASSWORD is required}" | sed 's/"/""/g')
printf '"%s" "%s"\n' "$user" "$password" > /tmp/pgbouncer/userlist.txt
exec pgbouncer /etc/pgbouncer/pgbouncer.ini
