#!/usr/bin/env bash
# schemathesis with every check (`--checks all`: also which inputs the API accepts or refuses) against a
# running Campus Search, as an admin and as a student, with a fixed seed. The test suite runs a smaller,
# answer-only version (tests/test_schemathesis.py).
#
#   JWT_SECRET_KEY=... bench/schemathesis.sh http://127.0.0.1:5100 [examples per operation, default 30]
#
# Needs the server's JWT_SECRET_KEY (to mint the two tokens) and rate limits off on the server
# (RATE_LIMITS_ENABLED=false), or most student requests are answered 429. Admin runs PUT, PATCH and
# DELETE on /api/admin/documents: point it at a throwaway database, never at production.
# Reports go to ./schemathesis-report/; the exit status is non-zero when anything failed.
set -u
base="${1:?usage: JWT_SECRET_KEY=... $0 BASE_URL [EXAMPLES]}"
examples="${2:-30}"
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="$here/.venv/bin"
status=0
for role in admin student; do
    token="$("$bin/campus-search" token --sub "schemathesis-$role" --role "$role" --ttl 7200)" || exit 2
    echo "== $role"
    "$bin/st" --config-file "$here/bench/schemathesis.toml" run "$base/api/openapi.json" --checks all --max-examples "$examples" --seed 42 --workers 1 \
        --request-timeout 60 --header "Authorization: Bearer $token" \
        --report junit --report-junit-path "schemathesis-report/$role.xml" || status=1
done
exit $status
