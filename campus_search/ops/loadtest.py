"""``campus-search loadtest``: concurrent users searching a running server, with the brief's figures.

Each simulated user is a thread with its own HTTP session and its own bearer token (minted with the
configured HS256 secret as ``loadtest-NNN``, or one token given with ``--token``), sending
``POST /api/search`` with queries from a small built-in list (or a file) in turn. It talks only to the
one URL it is given (default: this machine), and it is bounded: at most ``users x requests`` requests,
and it stops at the deadline whatever is left. ``--pause S`` makes each user wait S seconds between its
searches (think time), so the offered rate stays near ``users / (S + latency)``: below nginx's per-address
limit and the role's own, when the load comes from one address and a few tokens.

A request still running when the deadline comes is abandoned and reported as ``cut_at_deadline``, not
as a failure (the server did nothing wrong).
Reported: success rate, average / p50 / p95 / max latency of successful requests, requests per second
over the wall time (answered requests, as the brief counts them: a connection that failed is not an
answer), how many were rate limited (429), how many *failed* -- every other outcome: an error status,
no connection, a timeout -- by status, and how many answers came from the cache. The text report and
the JSON use the same words for the same counts. A readable report first, then one JSON object on the
last line. ``campus-search loadtest`` exits 1 when any request failed (rate limiting is the server
doing its job, not a failure; ``--fail-under`` sets a floor on the success rate that counts it).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

MAX_USERS = 256
MAX_REQUESTS_PER_USER = 10_000
MAX_DURATION = 900.0

DEFAULT_QUERIES = (
    "password reset instructions for staff",
    "how do I connect to eduroam wifi",
    "library book renewal and overdue fines",
    "research ethics approval process",
    "lab safety induction requirements",
    "annual leave policy for staff",
    "exam resit timetable",
    "VPN remote access setup",
    "multi-factor authentication for my university account",
    "how to book a study room in the library",
    "special circumstances and coursework extensions",
    "expenses claims and purchasing cards",
)


@dataclass(frozen=True)
class LoadTestConfig:
    url: str = "http://127.0.0.1:5100"
    users: int = 10
    requests_per_user: int = 10
    duration: float = 60.0  # seconds; the run stops at this deadline
    timeout: float = 30.0  # per request
    queries: Sequence[str] = DEFAULT_QUERIES
    max_results: int = 5
    distinct: bool = False  # make every query unique so the result cache cannot answer
    pause: float = 0.0  # seconds each user waits between its searches (think time)

    def validate(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("--url must be an http:// or https:// URL")
        if not 1 <= self.users <= MAX_USERS:
            raise ValueError(f"--users must be 1-{MAX_USERS}")
        if not 1 <= self.requests_per_user <= MAX_REQUESTS_PER_USER:
            raise ValueError(f"--requests must be 1-{MAX_REQUESTS_PER_USER}")
        if not 0 < self.duration <= MAX_DURATION:
            raise ValueError(f"--duration must be between 0 and {MAX_DURATION:g} seconds")
        if not self.queries:
            raise ValueError("no queries to send")
        if not 0 <= self.pause <= MAX_DURATION:
            raise ValueError(f"--pause must be between 0 and {MAX_DURATION:g} seconds")


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)  # successful requests only
    statuses: Counter[str] = field(default_factory=Counter)
    from_cache: int = 0
    sent: int = 0
    cut: int = 0  # requests the deadline cut short (not counted as sent or failed)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _user(cfg: LoadTestConfig, token: str, index: int, deadline: float, tally: _Tally) -> None:
    endpoint = cfg.url.rstrip("/") + "/api/search"
    with requests.Session() as session:
        session.headers.update({"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        for n in range(cfg.requests_per_user):
            if time.monotonic() >= deadline:
                return
            query = cfg.queries[(index + n) % len(cfg.queries)]
            if cfg.distinct:
                query = f"{query} (u{index} r{n})"
            body: dict[str, Any] = {"query": query, "config": {"max_results": cfg.max_results}}
            started = time.perf_counter()
            limit = min(cfg.timeout, max(deadline - time.monotonic(), 0.1))
            try:
                response = session.post(endpoint, json=body, timeout=limit)
                status = str(response.status_code)
                cached = response.ok and bool(_json(response).get("from_cache"))
            except requests.Timeout as exc:
                if limit < cfg.timeout:  # the run's deadline, not the server, ended this request
                    with tally.lock:
                        tally.cut += 1
                    return
                status, cached = f"error:{exc.__class__.__name__}", False
            except requests.RequestException as exc:
                status, cached = f"error:{exc.__class__.__name__}", False
            elapsed = time.perf_counter() - started
            with tally.lock:
                tally.sent += 1
                tally.statuses[status] += 1
                if status.startswith("2"):
                    tally.latencies.append(elapsed)
                    tally.from_cache += int(cached)
            if cfg.pause and n + 1 < cfg.requests_per_user:
                if deadline - time.monotonic() <= cfg.pause:
                    return  # the next search would start after the deadline
                time.sleep(cfg.pause)


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def run_loadtest(cfg: LoadTestConfig, tokens: Sequence[str]) -> dict[str, Any]:
    """Run the test; ``tokens`` holds one bearer token per user (or one shared by all)."""
    cfg.validate()
    tally = _Tally()
    started = time.perf_counter()
    deadline = time.monotonic() + cfg.duration
    with ThreadPoolExecutor(max_workers=cfg.users, thread_name_prefix="loadtest") as pool:
        futures = [pool.submit(_user, cfg, tokens[i % len(tokens)], i, deadline, tally) for i in range(cfg.users)]
        for f in futures:
            f.result()
    wall = time.perf_counter() - started
    ok = len(tally.latencies)
    lat = tally.latencies
    limited = tally.statuses.get("429", 0)
    failures = {k: v for k, v in sorted(tally.statuses.items()) if not k.startswith("2") and k != "429"}
    answered = sum(v for k, v in tally.statuses.items() if not k.startswith("error:"))
    return {
        "url": cfg.url,
        "users": cfg.users,
        "requests": tally.sent,
        "planned_requests": cfg.users * cfg.requests_per_user,
        "successful": ok,
        "success_rate": round(100.0 * ok / tally.sent, 2) if tally.sent else 0.0,
        "rate_limited": limited,
        "failed": sum(failures.values()),  # neither successful nor rate limited
        "failures": failures,
        "statuses": dict(sorted(tally.statuses.items())),
        "from_cache": tally.from_cache,
        "avg_s": round(sum(lat) / ok, 4) if ok else 0.0,
        "p50_s": round(percentile(lat, 50), 4),
        "p95_s": round(percentile(lat, 95), 4),
        "max_s": round(max(lat), 4) if lat else 0.0,
        "requests_per_second": round(answered / wall, 2) if wall > 0 else 0.0,
        "successful_per_second": round(ok / wall, 2) if wall > 0 else 0.0,
        "duration_s": round(wall, 3),
        "stopped_at_deadline": tally.sent < cfg.users * cfg.requests_per_user,
        "cut_at_deadline": tally.cut,
    }


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report (the JSON line follows it)."""
    failures = f"{r['failed']} (" + ", ".join(f"{k}: {v}" for k, v in r["failures"].items()) + ")" \
        if r["failed"] else "none"
    lines = [
        "=" * 60,
        f"LOAD TEST  {r['url']}",
        "=" * 60,
        f"Users x requests:   {r['users']} x {r['planned_requests'] // max(r['users'], 1)}"
        f"{'  (stopped at the deadline)' if r['stopped_at_deadline'] else ''}",
        f"Requests sent:      {r['requests']} in {r['duration_s']:.2f} s",
        f"Success rate:       {r['success_rate']:.1f}% ({r['successful']} ok)",
        f"Average response:   {r['avg_s']:.3f} s",
        f"p50 / p95 / max:    {r['p50_s']:.3f} / {r['p95_s']:.3f} / {r['max_s']:.3f} s",
        f"Requests/second:    {r['requests_per_second']:.2f} answered, {r['successful_per_second']:.2f} successful",
        f"Rate limited (429): {r['rate_limited']}",
        f"Failed:             {failures}",
        f"Served from cache:  {r['from_cache']}",
        "=" * 60,
    ]
    return "\n".join(lines)
