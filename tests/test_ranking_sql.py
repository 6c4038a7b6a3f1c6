"""The final score and the fusion as the search statement computes them (ranking.py's
``business_score_sql``, fusion.py's ``fusion_sql``) against the Python rules they implement
(``business_score``, ``fuse``), on a real PostgreSQL: the same float8 bits for every row, so a page ranked
in the statement is the page the Python rules rank (tests/test_congruence.py holds whole pages to that)."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from campus_search.retrieval.fusion import METHODS, FusionConfig, fuse, fusion_sql
from campus_search.retrieval.ranking import business_score, business_score_sql
from campus_search.security.roles import CAMPUS_BONUS, Principal, build_roles

ROLES = build_roles()
NOW = dt.datetime(2026, 12, 2, 9, 30, 15, 123457)


@pytest.fixture(scope="module")
def conn(make_database: Any) -> Iterator[psycopg.Connection]:
    with psycopg.connect(make_database(), autocommit=True) as c:
        yield c


def _documents(pick: random.Random, n: int) -> list[dict[str, Any]]:
    campuses = [*CAMPUS_BONUS, "Online", None]
    out = []
    for _ in range(n):
        reviewed = None
        if pick.random() < 0.8:  # past and future, to the microsecond; some on NOW itself, some years old
            reviewed = NOW + dt.timedelta(days=pick.randint(-1500, 30), seconds=pick.randint(0, 86399),
                                          microseconds=pick.randint(0, 999_999))
            if pick.random() < 0.05:
                reviewed = NOW
        out.append({"priority": pick.randint(1, 5), "campus": pick.choice(campuses), "last_reviewed": reviewed,
                    "relevance": pick.choice([pick.random(), pick.uniform(-1, 1), 0.0, 1.0])})
    return out


def _sql_scores(conn: psycopg.Connection, docs: list[dict[str, Any]], user: Principal) -> list[float]:
    expr, params = business_score_sql("x.relevance", "x", user, NOW)
    rows = conn.execute(
        f"SELECT {expr} FROM unnest(%(rel)s::float8[], %(pri)s::smallint[], %(campus)s::text[], "
        f"%(rev)s::timestamp[]) WITH ORDINALITY AS x(relevance, priority, campus, last_reviewed, n) ORDER BY x.n",
        {**params, "rel": [d["relevance"] for d in docs], "pri": [d["priority"] for d in docs],
         "campus": [d["campus"] for d in docs], "rev": [d["last_reviewed"] for d in docs]}).fetchall()
    return [r[0] for r in rows]


@pytest.mark.parametrize("campus", [None, "Central Campus", "Easter Bush", "Online"])
def test_business_score_in_sql_is_the_python_rule_bit_for_bit(conn: psycopg.Connection, campus: str | None) -> None:
    """Every document (priority, campus or none, reviewed long ago, lately, in the future, at ``now``, or
    never) gets exactly the Python score, for a user on each kind of campus and on none."""
    user = Principal("u", ROLES["staff"], ("Informatics",), campus=campus)
    docs = _documents(random.Random(f"business-{campus}"), 400)
    expected = [business_score(d["relevance"], d, user, NOW) for d in docs]
    assert _sql_scores(conn, docs, user) == expected
    # and the terms are really there: the bonus, the priority and the freshness each move some score
    assert len({round(e - d["relevance"], 9) for e, d in zip(expected, docs, strict=True)}) > 20


def _fusion_rows(pick: random.Random, n: int) -> list[tuple[int, float, float, bool, bool]]:
    rows = []
    for i in range(n):
        in_dense, in_lex = pick.choice([(True, False), (False, True), (True, True)])
        cos = pick.choice([pick.uniform(-0.2, 0.95), 0.5])  # some ties
        bm25 = pick.choice([pick.uniform(0, 30), 7.25, 0.0])
        rows.append((1000 + 7 * i, cos, bm25, in_dense, in_lex))
    return rows


def _sql_fusion(conn: psycopg.Connection, rows: list[tuple[int, float, float, bool, bool]],
                config: FusionConfig) -> list[float]:
    expr, params = fusion_sql(config, "x")
    got = conn.execute(
        f"SELECT x.id, {expr} FROM unnest(%(id)s::bigint[], %(cos)s::float8[], %(bm)s::float8[], %(d)s::bool[], "
        f"%(l)s::bool[]) AS x(id, similarity, bm25, in_dense, in_lex)",
        {**params, "id": [r[0] for r in rows], "cos": [r[1] for r in rows], "bm": [r[2] for r in rows],
         "d": [r[3] for r in rows], "l": [r[4] for r in rows]}).fetchall()
    by_id = dict(got)
    return [by_id[r[0]] for r in rows]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 2, 65])
def test_fusion_in_sql_is_the_python_rule_bit_for_bit(conn: psycopg.Connection, method: str, n: int) -> None:
    """Over a query's candidates (rows in id order, so a tie in rank goes to the lower id in both), the
    statement's relevance is exactly ``fuse``'s, for each method; also when every score is the same
    (min-max of a constant list) and for one candidate alone."""
    pick = random.Random(n * 31 + len(method))
    for config in (FusionConfig(method), FusionConfig(method, alpha=0.35, rrf_k=10)):
        for rows in (_fusion_rows(pick, n), [(5 + i, 0.4, 2.0, True, i % 2 == 0) for i in range(n)]):
            expected = fuse([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows],
                            config)
            assert _sql_fusion(conn, rows, config) == expected, (method, config)


def test_fusion_sql_refuses_an_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown fusion method"):
        fusion_sql(FusionConfig("bm42"))
