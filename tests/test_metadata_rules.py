"""The one rule for how a write may change access metadata (campus_search.ingest.metadata): pure functions,
checked case by case and exhaustively over a grid of stored/stated metadata."""

from __future__ import annotations

import itertools

import pytest

from campus_search.errors import BadRequest, IngestError
from campus_search.ingest.metadata import (
    FILE_KEYS,
    FOLDER_KEYS,
    AccessMetadata,
    check_keys,
    loosenings,
    resolve,
)

DEPT_A = AccessMetadata(department="IT Services", visibility="department", clearance_level=3)
PUBLIC = AccessMetadata(department="IT Services", visibility="public", clearance_level=3)


@pytest.mark.parametrize("after, fields", [
    (DEPT_A, []),
    (AccessMetadata(department="IT Services", visibility="department", clearance_level=4), []),  # tighter
    (PUBLIC, ["visibility"]),
    (AccessMetadata(department="Finance", visibility="department", clearance_level=3), ["department"]),
    (AccessMetadata(department="IT Services", visibility="department", clearance_level=2), ["clearance_level"]),
    (AccessMetadata(department=None, visibility="public", clearance_level=1), ["visibility", "clearance_level"]),
    (AccessMetadata(department="IT Services", visibility="department", clearance_level=3, campus="Easter Bush",
                    priority=5), []),  # ranking fields are not access
])
def test_loosenings_from_department_clearance_3(after: AccessMetadata, fields: list[str]) -> None:
    assert [c.field for c in loosenings(DEPT_A, after)] == fields


def test_public_to_department_and_department_change_under_public_are_not_loosening() -> None:
    assert loosenings(PUBLIC, DEPT_A) == []
    assert loosenings(PUBLIC, AccessMetadata(department="Finance", visibility="public", clearance_level=3)) == []


def test_unstated_fields_keep_stored_values_and_null_clears_only_clearable_ones() -> None:
    stored = AccessMetadata(department="IT Services", visibility="department", clearance_level=4, campus="KB",
                            priority=5)
    assert resolve(stored, {}).meta == stored
    assert resolve(stored, {"campus": None}).meta.campus is None
    for name in ("visibility", "clearance_level", "priority"):
        with pytest.raises(BadRequest, match=f"{name} cannot be cleared"):
            resolve(stored, {name: None})
    with pytest.raises(BadRequest, match="needs a department"):
        resolve(stored, {"department": None})
    assert resolve(PUBLIC, {"department": None}).meta.department is None


def test_loosening_is_held_back_unless_allowed_and_tightening_always_applies() -> None:
    asked = {"visibility": "public", "clearance_level": 1, "priority": 1}
    held = resolve(DEPT_A, asked)
    assert (held.meta.visibility, held.meta.clearance_level, held.meta.priority) == ("department", 3, 1)
    assert [c.field for c in held.held_back] == ["visibility", "clearance_level"] and held.loosened == []
    done = resolve(DEPT_A, asked, allow_loosening=True)
    assert (done.meta.visibility, done.meta.clearance_level) == ("public", 1) and done.held_back == []
    assert [str(c) for c in done.loosened] == ["visibility 'department' -> 'public'", "clearance_level 3 -> 1"]
    tighter = resolve(PUBLIC, {"visibility": "department", "clearance_level": 5})
    assert (tighter.meta.visibility, tighter.meta.clearance_level, tighter.held_back) == ("department", 5, [])
    # one aspect held back, the other tightened: visibility stays, clearance rises
    mixed = resolve(DEPT_A, {"visibility": "public", "clearance_level": 5})
    assert (mixed.meta.visibility, mixed.meta.clearance_level) == ("department", 5)


def test_pinned_fields_only_tighten_even_with_allow_loosening() -> None:
    stored = AccessMetadata(department="IT Services", visibility="department", clearance_level=4, priority=5)
    res = resolve(stored, {"clearance_level": 2, "priority": 1}, allow_loosening=True,
                  pinned={"clearance_level", "priority"})
    assert (res.meta.clearance_level, res.meta.priority) == (4, 5)
    assert {c.field for c in res.pinned} == {"clearance_level", "priority"}
    assert resolve(stored, {"clearance_level": 5}, pinned={"clearance_level"}).meta.clearance_level == 5


def test_new_document_gets_the_configured_default_visibility() -> None:
    res = resolve(None, {"department": "Library"})
    assert (res.meta.visibility, res.defaults) == ("department", {"visibility": "department"})
    with pytest.raises(BadRequest, match="no visibility stated and no department"):
        resolve(None, {"clearance_level": 2})
    assert resolve(None, {}, default_visibility="public").meta.visibility == "public"
    stated = resolve(None, {"visibility": "public"})
    assert (stated.meta.visibility, stated.defaults) == ("public", {})


GRID = [AccessMetadata(department=d, visibility=v, clearance_level=c)
        for v, d, c in itertools.product(("public", "department"), ("IT Services", "Finance"), (1, 3, 5))]


def test_no_resolution_without_allow_loosening_is_ever_looser_than_what_was_stored() -> None:
    """Exhaustive over the grid: stored x stated (each field stated or not) x pins."""
    keys = ("department", "visibility", "clearance_level")
    for stored, target in itertools.product(GRID, GRID):
        for mask in itertools.product((False, True), repeat=3):
            given = {k: getattr(target, k) for k, on in zip(keys, mask, strict=True) if on}
            for pinned in ((), ("clearance_level",), ("visibility",)):
                try:
                    res = resolve(stored, given, pinned=pinned)
                except BadRequest:
                    continue  # e.g. visibility department stated with a public stored doc and no department
                assert loosenings(stored, res.meta) == [], (stored, given, pinned, res.meta)
                if not loosenings(stored, stored.merged(given)) and not pinned:
                    assert res.meta == stored.merged(given)  # nothing held back that was not loosening


def test_unknown_keys_get_a_did_you_mean() -> None:
    with pytest.raises(IngestError, match=r"unknown metadata key 'visibilty' \(did you mean 'visibility'\?\)"):
        check_keys({"visibilty": "department"}, FILE_KEYS, "x.md.meta.yaml", IngestError)
    with pytest.raises(BadRequest, match="unknown metadata key 'id'"):
        check_keys({"id": "a"}, FOLDER_KEYS, ".campus-search.yaml")
    check_keys({"title": "T", "id": "a", "clearance_level": 2}, FILE_KEYS, "front matter")
