"""Precomputed embeddings: ``campus-search chunks`` exports the inputs, ``ingest --vectors`` stores the
vectors an embedding farm made for them, through the same chunk, access-metadata and lexical path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from conftest import TEST_SECRET

from campus_search.cli import main as cli
from campus_search.embedding.local import LocalMiniLM
from campus_search.ingest.vectors import read_inputs

DOCS = {
    "boilers.md": "# Boiler maintenance\n\nThe boiler room is inspected every spring by Estates.\n\n"
                  "## Gas safety\n\nGas appliances carry a yearly safety certificate.\n",
    "printing.md": "# Printing credit\n\nStudents top up printing credit online before printing in the library.\n",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, make_database: Callable[[], str], data_dir: Path) -> str:
    dsn = make_database()
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    monkeypatch.setenv("JWT_SECRET_KEY", TEST_SECRET)
    monkeypatch.setenv("DB_POOL_MIN_SIZE", "1")
    monkeypatch.delenv("EMBEDDING_PROVIDER", raising=False)
    return dsn


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def export(capsys: pytest.CaptureFixture[str], corpus: Path, out: Path) -> list[tuple[str, str]]:
    assert cli.main(["chunks", str(corpus), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    header = json.loads(out.read_text().splitlines()[0])
    assert header["model"] == "all-MiniLM-L6-v2" and header["dimension"] == 384
    pairs = list(read_inputs(out))
    assert f"chunks: {len(pairs)} distinct chunk inputs" in err
    return pairs


def write_vectors(path: Path, header: dict[str, Any], rows: list[tuple[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(header) + "\n")
        for h, v in rows:
            fh.write(json.dumps({"hash": h, "embedding": [float(x) for x in v]}) + "\n")


def ingest(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    code = cli.main(["ingest", "--quiet", "--visibility", "public", *argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else {}), err


def stored(dsn: str) -> dict[str, np.ndarray]:
    with psycopg.connect(dsn) as conn:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        return {h: np.asarray(v.to_numpy(), dtype=np.float32)
                for h, v in conn.execute("SELECT content_hash, embedding FROM chunks").fetchall()}


def test_given_vectors_are_stored_instead_of_embedding(env: str, corpus: Path, tmp_path: Path,
                                                       embedder: LocalMiniLM,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pairs = export(capsys, corpus, tmp_path / "inputs.jsonl")
    assert len(pairs) >= 3
    # The "farm": the same model on the exported inputs, but each chunk deliberately given the vector of
    # the next chunk's input, so the test can tell a given vector from one computed during ingestion.
    vectors = embedder.embed([text for _, text in pairs])
    shifted = np.roll(vectors, 1, axis=0) * 3.0  # not normalised: ingestion normalises
    write_vectors(tmp_path / "vectors.jsonl", {"model": "all-MiniLM-L6-v2", "dimension": 384},
                  [(h, v) for (h, _), v in zip(pairs, shifted, strict=True)])

    code, summary, err = ingest(capsys, str(corpus), "--vectors", str(tmp_path / "vectors.jsonl"))
    assert code == 0, err
    assert summary["chunks_embedded"] == 0 and summary["chunks_given"] == summary["chunks_written"] == len(pairs)
    assert f"vectors: {len(pairs)} precomputed embeddings" in err
    got = stored(env)
    for (h, _), v in zip(pairs, np.roll(vectors, 1, axis=0), strict=True):
        assert np.allclose(got[h], v, atol=1e-6)  # the given (normalised) vector, not the chunk's own

    # lexical index and access metadata came through the ordinary path
    with psycopg.connect(env) as conn:
        assert conn.execute("SELECT count(*) FROM lexical_postings WHERE term = 'boiler'").fetchone()[0] >= 1
        assert conn.execute("SELECT count(DISTINCT document_id) FROM chunks").fetchone()[0] == 2


def test_chunks_without_a_given_vector_are_embedded_here(env: str, corpus: Path, tmp_path: Path,
                                                         embedder: LocalMiniLM,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pairs = export(capsys, corpus, tmp_path / "inputs.jsonl")
    first = pairs[:1]
    write_vectors(tmp_path / "some.jsonl", {"model": "all-MiniLM-L6-v2", "dimension": 384},
                  [(h, embedder.embed([t])[0]) for h, t in first])
    code, summary, err = ingest(capsys, str(corpus), "--vectors", str(tmp_path / "some.jsonl"))
    assert code == 0, err
    assert summary["chunks_given"] == 1 and summary["chunks_embedded"] == len(pairs) - 1


def test_npz_archives_are_accepted(env: str, corpus: Path, tmp_path: Path, embedder: LocalMiniLM,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    pairs = export(capsys, corpus, tmp_path / "inputs.jsonl")
    np.savez(tmp_path / "v.npz", hashes=np.array([h for h, _ in pairs]), model=np.array("all-MiniLM-L6-v2"),
             embeddings=embedder.embed([t for _, t in pairs]))
    code, summary, err = ingest(capsys, str(corpus), "--vectors", str(tmp_path / "v.npz"))
    assert code == 0, err
    assert summary["chunks_given"] == len(pairs) and summary["chunks_embedded"] == 0


@pytest.mark.parametrize("header, row, message", [
    ({"model": "bge-small-en", "dimension": 384}, None, "vectors are from model 'bge-small-en'"),
    ({"model": "all-MiniLM-L6-v2", "dimension": 768}, None, "vectors have 768 dimensions"),
    ({"model": "all-MiniLM-L6-v2", "dimension": 384}, [0.1] * 383, "embedding has shape (383,)"),
    ({"model": "all-MiniLM-L6-v2", "dimension": 384}, [float("nan")] * 384, "non-finite or all-zero"),
    ({"model": "all-MiniLM-L6-v2", "dimension": 384}, [0.0] * 384, "non-finite or all-zero"),
    ({"dimension": 384}, None, "the first line must be a header"),
])
def test_a_bad_vector_file_is_refused_before_anything_is_written(
        env: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        header: dict[str, Any], row: list[float] | None, message: str) -> None:
    pairs = export(capsys, corpus, tmp_path / "inputs.jsonl")
    path = tmp_path / "bad.jsonl"
    write_vectors(path, header, [(pairs[0][0], row if row is not None else [0.1] * 384)])
    code, _, err = ingest(capsys, str(corpus), "--vectors", str(path))
    assert code == 2
    assert message in err and "Traceback" not in err
    with psycopg.connect(env) as conn:
        assert conn.execute("SELECT count(*) FROM documents").fetchone()[0] == 0
