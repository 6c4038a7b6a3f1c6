"""The shortened rehearsal of the production stack (deploy/rehearse --short): the whole topology of
docker-compose.prod.yml brought up from the project's own files as native processes on 127.0.0.1, one
load burst of the brief's load test through nginx over TLS, the replica stopped under load with zero
failed searches, and Prometheus firing ReadReplicaUnavailable from prometheus/alerts.yml (its `for:`
shortened by the rehearsal's visible rewrite); `promtool check rules/config` pass.

Needs Debian's pgbouncer, nginx, redis-server, prometheus (with promtool) and openssl: `make test`
installs them when it runs as root with apt; without them this test is skipped and says which are missing.
The full rehearsal (every fault, backup/restore and point-in-time recovery drills) is `make rehearse`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "deploy"))
from stack import missing_programs  # noqa: E402

MISSING = missing_programs()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"stack programs not installed: {' '.join(MISSING)} "
                                                      "(make system-tools installs them as root with apt)")


def test_short_rehearsal_survives_a_replica_stop_under_load() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "DB_"))}
    out = subprocess.run([sys.executable, str(ROOT / "deploy" / "rehearse"), "--short", "--workers", "1"],
                         capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    lines = out.stdout.strip().splitlines()
    assert lines, out.stderr[-3000:]
    report = json.loads(lines[-1])
    assert report["promtool"] == {"check_rules": True, "check_config": True}
    (replica,) = report["faults"]
    assert replica["fault"] == "replica stopped, restarted"
    assert replica["sent"] > 0 and replica["failed"] == 0, replica  # searches kept succeeding
    assert replica["failed_before"] == 0 and replica["failed_after"] == 0
    assert replica["probe_failures"] == 0
    assert replica["alert_state"] == "firing", replica["alerts_seen"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = {r["file"] for r in report["rewrites"]}
    assert {"postgresql.conf", "pgbouncer/pgbouncer.ini", "nginx/nginx.conf", "prometheus.yml"} <= files
