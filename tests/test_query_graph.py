"""Queries are embedded with real int8 products (embedding/quantized.py), documents with the shipped graph.

The query graph is derived from the checksummed model file, cached next to its own sha256 and derived again
when the cached file fails it; EMBEDDING_QUERY_INT8 decides (``auto``: the CPU's VNNI flag); the search
path, the health probe and the shared query-vector cache use the graph queries use, and a vector of one
graph is never served for the other.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from test_embedding import PINNED, TEXT

from campus_search.config import load_settings
from campus_search.embedding.local import LocalMiniLM
from campus_search.embedding.quantized import cpu_has_vnni, fuse_attention, fuse_gelu, query_int8_enabled
from campus_search.errors import ConfigError

QUERIES = ["password reset instructions for staff", "How do I renew a library book online?",
           "exam resit timetable", TEXT]

pytestmark = pytest.mark.skipif(not cpu_has_vnni(), reason="the int8 query graph is the default only with VNNI")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def int8(model_dir: Path) -> LocalMiniLM:
    return LocalMiniLM(threads=1, query_int8=True, cache_dir=model_dir)


def cached_graph(model_dir: Path) -> Path:
    (path,) = [p for p in model_dir.iterdir() if p.suffix == ".onnx"]
    return path


def test_queries_use_int8_products_and_documents_keep_the_shipped_graph(int8: LocalMiniLM, model_dir: Path) -> None:
    queries = int8.embed_query(QUERIES)
    documents = int8.embed(QUERIES)
    # documents: bit for bit the pinned vector of the checksummed model, whatever the query graph
    assert hashlib.sha256(documents[3].tobytes()).hexdigest() == PINNED
    # queries: another computation of the same model -- never the same bits, always within cosine 0.99
    cosines = (queries * documents).sum(axis=1)
    assert not np.array_equal(queries, documents)
    assert cosines.min() > 0.99, cosines
    assert np.allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    # the graph really multiplies in int8, but for the first layer's feed-forward down projection: each
    # layer's attention is one int8 QAttention (query, key and value in one product), its output and
    # feed-forward projections MatMulInteger
    graph = onnx.load(str(cached_graph(model_dir))).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QAttention") == 6 and ops.count("MatMulInteger") == 17
    assert ops.count("DynamicQuantizeLinear") > 0
    assert not {"Softmax", "Transpose", "Attention"} & set(ops)  # no attention left unfused or in float32
    assert ops.count("Gelu") == 6 and "Erf" not in ops  # each layer's GELU one node
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    float_weights = [node for node in graph.node
                     if node.op_type == "MatMul" and any(name in shapes for name in node.input)]
    assert [shapes[next(n for n in node.input if n in shapes)] for node in float_weights] == [(1536, 384)]
    weighted = [node for node in graph.node if node.op_type in ("MatMul", "MatMulInteger")
                and any(name in shapes for name in node.input)]
    assert weighted.index(float_weights[0]) < 6  # the first layer's (its six weight products come first)


@pytest.mark.parametrize("gelu", [False, True])
def test_the_fused_attention_and_gelu_compute_what_the_export_does(int8: LocalMiniLM, tmp_path: Path,
                                                                    gelu: bool) -> None:
    # the float32 graph with fuse_attention (and fuse_gelu) applied, no quantization: the shipped graph's
    # vectors, for queries alone and for a padded batch (the mask), within float rounding
    import onnxruntime as ort

    folded = tmp_path / "folded.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(int8.model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    model = fuse_attention(onnx.load(str(folded)))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Attention") == 6 and "Softmax" not in ops and len(ops) < 120  # from 261
    if gelu:
        model = fuse_gelu(model)
        before, ops = ops, [node.op_type for node in model.graph.node]
        assert ops.count("Gelu") == 6 and not {"Erf", "Div"} & set(ops)
        assert len(ops) == len(before) - 6 * 4  # five nodes a layer (Div, Erf, Add, Mul, Mul) became one
    # the session as queries get it: without onnxruntime's own fusions, so the graph's nodes are what runs
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused = ort.InferenceSession(model.SerializeToString(), sess_options=plain, providers=["CPUExecutionProvider"])
    texts = QUERIES + ["a much longer text than any of the queries, which pads the others in its batch"]
    expected = int8.embed(texts)
    for batch in (1, 5):
        vectors = int8._embed(fused, texts, batch)
        assert np.abs(vectors - expected).max() < 1e-5, batch


def test_a_graph_whose_gelus_do_not_fuse_is_refused(int8: LocalMiniLM, tmp_path: Path) -> None:
    import onnxruntime as ort

    folded = tmp_path / "folded.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(int8.model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(folded))
    # the GELUs' constant 1 (one initializer the six layers share) changed to 2: 2 + erf(x / sqrt 2) is no
    # GELU, so nothing fuses -- and a graph left unfused is refused, never derived half-fused
    adds = [n for n in model.graph.node if n.op_type == "Add" and any(
        p.op_type == "Erf" for p in model.graph.node if p.output[0] in n.input)]
    constant = next(name for name in adds[0].input if not any(p.output[0] == name for p in model.graph.node
                                                              if p.op_type == "Erf"))
    (init,) = [init for init in model.graph.initializer if init.name == constant]  # folded: no Constant nodes
    assert onnx.numpy_helper.to_array(init) == 1.0
    init.CopyFrom(onnx.numpy_helper.from_array(np.array(2.0, dtype=np.float32), constant))
    with pytest.raises(ConfigError, match=r"expected 6 fused GELUs, found 0 \(6 left unfused\)"):
        fuse_gelu(model)


def test_the_query_session_runs_without_the_slow_fused_layer_norm(int8: LocalMiniLM,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    seen: dict[str, Any] = {}
    real = ort.InferenceSession

    def recording(path: Any, *args: Any, **kwargs: Any) -> Any:
        seen[Path(str(path)).name] = kwargs.get("disabled_optimizers")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    fresh = LocalMiniLM(threads=1, query_int8=True, cache_dir=int8.cache_dir)
    fresh.warm()
    fresh.embed(QUERIES[:1])
    assert seen == {cached_graph(int8.cache_dir).name: ["SkipLayerNormFusion"], int8.model_path.name: []}


def test_a_query_embeds_to_the_same_bits_alone_and_among_others(int8: LocalMiniLM) -> None:
    # one activation scale per call: batched with a longer text, a query would get another vector
    alone = [int8.embed_query([q])[0] for q in QUERIES]
    together = int8.embed_query(["a much longer text than any of the queries, which would widen the batch"]
                                + QUERIES)[1:]
    assert all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))


def test_the_shipped_graph_embeds_queries_when_int8_is_off(model_dir: Path) -> None:
    plain = LocalMiniLM(threads=1, query_int8=False, cache_dir=model_dir)
    assert plain.query_graph == "float32"
    assert np.array_equal(plain.embed_query(QUERIES), plain.embed(QUERIES))


def test_a_cached_graph_that_fails_its_checksum_is_derived_again(int8: LocalMiniLM, model_dir: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    int8.warm()
    path = cached_graph(model_dir)
    good = path.read_bytes()
    expected = int8.embed_query(QUERIES)
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF  # one byte in the weights: a session would load it and compute garbage
    path.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="campus_search.embedding.quantized"):
        again = LocalMiniLM(threads=1, query_int8=True, cache_dir=model_dir)
        vectors = again.embed_query(QUERIES)
    assert "fails its checksum" in caplog.text
    assert path.read_bytes() == good
    assert np.array_equal(vectors, expected)


def test_an_unusable_cache_directory_derives_for_the_process_and_leaves_nothing(
        tmp_path: Path, int8: LocalMiniLM, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory would be")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with caplog.at_level(logging.WARNING, logger="campus_search.embedding.quantized"):
        model = LocalMiniLM(threads=1, query_int8=True, cache_dir=blocker / "models")
        vectors = model.embed_query(QUERIES)
    assert "cannot cache the query graph" in caplog.text
    assert np.array_equal(vectors, int8.embed_query(QUERIES))
    assert list(scratch.iterdir()) == []  # the process's own copy is removed once loaded


def test_auto_follows_the_cpu_flags_and_the_setting_is_checked(tmp_path: Path) -> None:
    with_vnni, without = tmp_path / "vnni", tmp_path / "avx2"
    with_vnni.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert query_int8_enabled("auto", str(with_vnni)) and not query_int8_enabled("auto", str(without))
    assert query_int8_enabled("true", str(without)) and not query_int8_enabled("false", str(with_vnni))
    assert not query_int8_enabled("auto", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="EMBEDDING_QUERY_INT8 must be auto, true or false"):
        load_settings({"DATA_DIR": str(tmp_path), "EMBEDDING_QUERY_INT8": "yes"})


def test_searches_and_the_health_probe_embed_with_the_query_graph(services_factory: Any, settings_factory: Any,
                                                                  embedder: LocalMiniLM,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert embedder.query_graph == "int8"  # conftest's embedder is the server's default on this CPU
    services = services_factory(settings_factory())
    query = "password reset instructions for staff"
    np.testing.assert_array_equal(services.searcher.embed_query(query), embedder.embed_query([query])[0])
    assert services.searcher.describe()["query_embedding"] == "int8"
    from campus_search.ops.health import HealthMonitor

    report = HealthMonitor(services).report()
    assert report["components"]["embedding_service"]["query_graph"] == "int8"
    assert report["components"]["embedding_service"]["healthy"]

    class Broken:
        def run(self, *args: Any) -> Any:
            raise RuntimeError("the query graph fails")

    # the probe embeds as a search does: a failing query graph is an unhealthy embedding service, even
    # though documents (the shipped graph) would still embed
    monkeypatch.setitem(embedder._sessions, "int8", Broken())
    report = HealthMonitor(services).report()
    assert not report["components"]["embedding_service"]["healthy"]
    assert embedder.embed([query]).shape == (1, 384)
