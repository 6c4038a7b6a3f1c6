"""The access model declared once (campus_search/security/access.py) and everything that follows from it:
the schema carries every declared column on documents, and no copy of them anywhere else (access by
reference, migration 017), and accepts every declared visibility; the SQL predicate equals the Python rule
on a grid of documents x principals with groups; the cache scope separates principals who see differently
and only them; the loosening rule for groups; the groups claim is bounded; the role table's group_scope."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import make_settings

from campus_search.ingest.metadata import AccessMetadata, loosenings, resolve
from campus_search.security import access
from campus_search.security.access import (
    AUDIENCES,
    METADATA_FIELDS,
    VISIBILITIES,
    clean_groups,
    explain,
    is_visible,
    scope_key,
    visible_sql,
)
from campus_search.security.roles import ANONYMOUS_ROLE, DEFAULT_ROLES, Principal, build_roles
from campus_search.services import Services


@pytest.fixture(scope="module")
def services(make_database: Any, embedder: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    settings = make_settings(make_database(), tmp_path_factory.mktemp("access-model"))
    svc = Services(settings, embedder=embedder).ensure_open()
    yield svc
    svc.close()


def columns_of(conn: Any, table: str) -> dict[str, str]:
    return dict(conn.execute("SELECT column_name, udt_name FROM information_schema.columns WHERE table_name = %s",
                             (table,)).fetchall())


def test_every_table_that_carries_access_has_every_declared_column(services: Services) -> None:
    with psycopg.connect(services.dsn) as conn:
        have = columns_of(conn, "documents")
        missing = [f.name for f in access.DOCUMENT_FIELDS if f.name not in have]
        assert not missing, missing
        for f in access.DOCUMENT_FIELDS:  # the declared type matches the column
            assert have[f.name] == {"text": "text", "int2": "int2", "timestamp": "timestamp",
                                    "text[]": "_text"}[f.copy_type], f.name
        # access by reference: the tables retrieval scans carry no copy that could go stale
        for table in ("chunks", "lexical_postings"):
            copies = [f.name for f in access.DOCUMENT_FIELDS if f.name in columns_of(conn, table)]
            assert copies == [], (table, copies)
        # every declared visibility is accepted, nothing else is; a group document needs a group
        for v in VISIBILITIES:
            conn.execute("INSERT INTO documents (external_id, title, content_hash, department, visibility, groups) "
                         "VALUES (%s, 't', 'h', 'D', %s, '{g}')", (f"v-{v}", v))
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO documents (external_id, title, content_hash, visibility) "
                         "VALUES ('bad', 't', 'h', 'everyone')")
        conn.rollback()
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO documents (external_id, title, content_hash, visibility) "
                         "VALUES ('bad', 't', 'h', 'group')")
        conn.rollback()


GROUP_NAMES = ("g1", "g2", "G1", "cn=maths,ou=groups,dc=ed", "kurs-ø", "a'b")


def grid_chunks() -> list[dict[str, Any]]:
    groups_sets = ((), ("g1",), ("g2", "cn=maths,ou=groups,dc=ed"), ("G1",), ("kurs-ø", "a'b", "g1"))
    out = []
    for i, (c, v, d, g) in enumerate(itertools.product(range(1, 6), VISIBILITIES, ("A", "B", None), groups_sets)):
        out.append({"id": i, "clearance_level": c, "visibility": v, "department": d, "groups": list(g)})
    return out


def grid_principals() -> Iterator[Principal]:
    custom = build_roles({"visitor": {"clearance": 3, "per_minute": 1, "per_hour": 1, "max_results": 1,
                                      "department_scope": "own", "group_scope": "none"},
                          "auditor": {"clearance": 4, "per_minute": 1, "per_hour": 1, "max_results": 1,
                                      "department_scope": "none", "group_scope": "all"}})
    roles = [*DEFAULT_ROLES.values(), ANONYMOUS_ROLE, custom["visitor"], custom["auditor"]]
    for role in roles:
        for depts in ((), ("A",), ("A", "B")):
            for groups in ((), ("g1",), ("g2", "kurs-ø"), ("g1",) * 1 + ("a'b",), GROUP_NAMES):
                yield Principal(f"{role.name}", role, depts, groups=tuple(groups))


def access_table(conn: Any, name: str, rows: list[dict[str, Any]]) -> None:
    """A temporary table ``name`` of documents' access columns, holding ``rows``."""
    conn.execute(f"CREATE TEMP TABLE {name} (id int, clearance_level int, visibility text, department text, "
                 "groups text[])")
    with conn.cursor().copy(f"COPY {name} FROM STDIN") as copy:
        for ch in rows:
            copy.write_row((ch["id"], ch["clearance_level"], ch["visibility"], ch["department"], ch["groups"]))


def test_sql_predicate_equals_the_python_rule_with_groups(services: Services) -> None:
    chunks = grid_chunks()
    with psycopg.connect(services.dsn) as conn:
        access_table(conn, "t", chunks)
        checked = 0
        for user in grid_principals():
            expected = {ch["id"] for ch in chunks if is_visible(ch, user)}
            clause, params = visible_sql(user)
            got = {r[0] for r in conn.execute(f"SELECT id FROM t d WHERE {clause}", params)}
            assert got == expected, (user, clause, got ^ expected)
            checked += 1
            # explain gives a reason for the audience and for the ceiling, and agrees on the decision
            for ch in chunks[::37]:
                reasons = explain(ch, user)
                assert len(reasons) == 2
                if is_visible(ch, user):
                    assert "within" in reasons[0] and "restricted" not in reasons[1] and "no " not in reasons[1]
    assert checked == 7 * 3 * 5  # roles x department sets x group sets
    # spot checks of the rule (SPEC §2 + docs/security.md): members only, admins see all
    doc = {"clearance_level": 2, "visibility": "group", "department": "A", "groups": ["g1"]}
    assert is_visible(doc, Principal("s", DEFAULT_ROLES["student"], groups=("g1",)))
    assert not is_visible(doc, Principal("a", DEFAULT_ROLES["academic"]))  # cross-departmental, not a member
    assert not is_visible(doc, Principal("t", DEFAULT_ROLES["staff"], ("A",)))  # the owning department's staff
    assert is_visible(doc, Principal("r", DEFAULT_ROLES["admin"]))
    assert not is_visible({**doc, "clearance_level": 3}, Principal("s", DEFAULT_ROLES["student"], groups=("g1",)))
    assert not is_visible(doc, Principal("s", DEFAULT_ROLES["student"], groups=("G1",)))  # exact, like departments
    # a department document is not opened by sharing a group, nor a group document by the department
    dept_doc = {"clearance_level": 1, "visibility": "department", "department": "A", "groups": ["g1"]}
    assert not is_visible(dept_doc, Principal("s", DEFAULT_ROLES["student"], groups=("g1",)))


def test_equal_scope_keys_see_the_same_chunks_and_different_groups_never_share_one() -> None:
    chunks = grid_chunks()
    by_key: dict[str, frozenset[int]] = {}
    for user in grid_principals():
        seen = frozenset(ch["id"] for ch in chunks if is_visible(ch, user))
        assert by_key.setdefault(scope_key(user), seen) == seen, scope_key(user)
    student = DEFAULT_ROLES["student"]
    one = Principal("a", student, groups=("g1",))
    assert scope_key(one) != scope_key(Principal("b", student, groups=("g2",)))
    assert scope_key(one) != scope_key(Principal("b", student))
    assert scope_key(Principal("b", student, groups=("g2", "g1"))) == scope_key(Principal("c", student,
                                                                                          groups=("g1", "g2")))
    assert scope_key(Principal("r", DEFAULT_ROLES["admin"], groups=("x",))) == scope_key(Principal(
        "r", DEFAULT_ROLES["admin"]))  # admins see every group: their groups do not split the cache
    big = Principal("b", student, groups=tuple(f"urn:mace:ed.ac.uk:groups:course-{i}" for i in range(500)))
    assert len(scope_key(big)) < 100  # bounded: a hash, not the list
    assert scope_key(big) != scope_key(Principal("b", student, groups=big.groups[:-1]))


def meta(**kw: Any) -> AccessMetadata:
    return AccessMetadata().merged(kw)


def test_loosening_rule_for_groups() -> None:
    g1 = meta(visibility="group", groups=["g1"], department="A", clearance_level=2)

    def fields(after: AccessMetadata) -> list[str]:
        return [c.field for c in loosenings(g1, after)]

    assert fields(meta(visibility="group", groups=["g1", "g2"], department="A", clearance_level=2)) == ["groups"]
    assert fields(meta(visibility="group", groups=["g2"], department="A", clearance_level=2)) == ["groups"]
    assert fields(meta(visibility="department", department="A", clearance_level=2)) == ["visibility"]
    assert fields(meta(visibility="public", department="A", clearance_level=2)) == ["visibility"]
    assert fields(meta(visibility="group", groups=["g1"], department="B", clearance_level=1)) == ["clearance_level"]
    dept = meta(visibility="department", department="A")
    assert [c.field for c in loosenings(dept, meta(visibility="group", groups=["g1"], department="A"))] == \
        ["visibility"]
    # removing a group or making a public document group-visible tightens: it applies without the act
    two = meta(visibility="group", groups=["g1", "g2"], department="A")
    res = resolve(two, {"groups": ["g2"]})
    assert res.meta.groups == ("g2",) and not res.held_back and not res.loosened
    assert resolve(meta(visibility="public"), {"visibility": "group", "groups": ["g1"]}).meta.visibility == "group"
    # without the act, an added group is held back and the whole audience stays as stored
    res = resolve(two, {"groups": ["g1", "g2", "g3"], "visibility": "group"})
    assert res.meta == two and [c.as_json() for c in res.held_back] == [
        {"field": "groups", "before": ["g1", "g2"], "after": ["g1", "g2", "g3"]}]
    # pinned groups: a file writer may only remove groups
    assert resolve(two, {"groups": ["g1"]}, pinned=["groups"]).meta.groups == ("g1",)
    kept = resolve(two, {"groups": ["g9"]}, pinned=["groups"], allow_loosening=True)
    assert kept.meta.groups == ("g1", "g2") and kept.pinned
    # validation: group visibility needs a group; groups are strings, bounded
    from campus_search.errors import BadRequest
    for bad in ({"visibility": "group"}, {"visibility": "group", "groups": []}, {"groups": [1]},
                {"groups": "x" * 300}, {"groups": [f"g{i}" for i in range(101)]}, {"groups": {"a": 1}}):
        with pytest.raises(BadRequest):
            meta(**bad)
    assert meta(groups=" g1 ").groups == ("g1",) and meta(groups=["b", "a", "b"]).groups == ("a", "b")


def test_groups_claim_is_bounded_and_a_malformed_claim_gives_fewer_groups() -> None:
    assert clean_groups(None) == ((), None)
    assert clean_groups("course-1") == (("course-1",), None)
    assert clean_groups(["b", "a", "a"]) == (("a", "b"), None)
    groups, problem = clean_groups(["ok", 5, "", "x" * 257, None])
    assert groups == ("ok",) and problem is not None and "4 groups claim entries" in problem
    groups, problem = clean_groups([f"g{i}" for i in range(access.MAX_PRINCIPAL_GROUPS + 1)])
    assert groups == () and problem is not None and "more than" in problem
    for raw in ({"g": 1}, 5, True):
        groups, problem = clean_groups(raw)
        assert groups == () and problem is not None


def test_role_table_group_scope() -> None:
    roles = build_roles()
    assert [roles[n].group_scope for n in ("student", "staff", "academic", "admin", "anonymous")] == \
        ["member", "member", "member", "all", "none"]
    visitor = build_roles({"visitor": {"clearance": 1, "per_minute": 1, "per_hour": 1, "max_results": 1,
                                       "department_scope": "none"}})["visitor"]
    assert visitor.group_scope == "member"  # a new role may leave it out
    assert build_roles({"academic": {"group_scope": "all"}})["academic"].group_scope == "all"
    with pytest.raises(ValueError, match="group_scope"):
        build_roles({"staff": {"group_scope": "own"}})


def test_declaration_is_the_only_list_of_access_columns() -> None:
    """No module outside the declaration spells the metadata column list by hand (the ten places this
    used to be): a new attribute then needs no edit there."""
    root = Path(__file__).resolve().parent.parent / "campus_search"
    spelled = "department, visibility, clearance_level"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if spelled in p.read_text(encoding="utf-8") and p.name != "access.py"]
    assert offenders == []
    assert {a.visibility for a in AUDIENCES} == set(VISIBILITIES)
    assert tuple(METADATA_FIELDS) == tuple(f.name for f in access.DOCUMENT_FIELDS)


def test_random_principals_and_documents_agree_in_sql_and_python(services: Services) -> None:
    rng = random.Random(15)
    names = [f"grp-{i}" for i in range(12)]
    rows = [{"id": i, "clearance_level": rng.randint(1, 5), "visibility": rng.choice(VISIBILITIES),
             "department": rng.choice(["A", "B", "C"]), "groups": rng.sample(names, rng.randint(0, 3))}
            for i in range(400)]
    with psycopg.connect(services.dsn) as conn:
        access_table(conn, "r", rows)
        for i in range(150):
            role = rng.choice([*DEFAULT_ROLES.values(), ANONYMOUS_ROLE])
            user = Principal(f"u{i}", role, tuple(rng.sample(["A", "B", "C"], rng.randint(0, 2))),
                             groups=tuple(rng.sample(names, rng.randint(0, 4))))
            clause, params = visible_sql(user, "c")
            got = {r[0] for r in conn.execute(f"SELECT id FROM r c WHERE {clause}", params)}
            assert got == {ch["id"] for ch in rows if is_visible(ch, user)}, user
