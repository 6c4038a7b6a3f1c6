"""The bundled embedder's vectors are pinned (issue 14): any change to how a query is embedded (session
options, tokenizer path, pooling, batching) must leave the vector of a fixed text bit-for-bit what it
was with the checksummed model, since the stored chunk vectors were made that way."""

from __future__ import annotations

import hashlib

import numpy as np

from campus_search.embedding.local import ONNX_SHA256, LocalMiniLM

TEXT = "How long may a student's library loan be renewed?"
#: sha256 of the float32 bytes of TEXT's vector, all-MiniLM-L6-v2 int8 ONNX (ONNX_SHA256 below)
PINNED = "c1d9b53b98c29873a4119ed9fb2de72aa6ac35e188b4f3c016d977c900c803c5"


def test_the_vector_of_a_fixed_text_is_pinned_to_the_checksummed_model() -> None:
    assert ONNX_SHA256.startswith("8199be6f")  # the pin below is this model's
    vector = LocalMiniLM(threads=1).embed([TEXT])[0]
    assert vector.dtype == np.float32 and vector.shape == (384,)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-6
    assert hashlib.sha256(vector.tobytes()).hexdigest() == PINNED


def test_a_query_alone_in_a_batch_and_with_more_threads_embeds_to_the_same_bits(embedder: LocalMiniLM) -> None:
    alone = LocalMiniLM(threads=1).embed([TEXT])[0]
    padded = embedder.embed(["a much longer text that pads the batch to a greater width than the first", TEXT])[1]
    assert embedder.session.get_session_options().intra_op_num_threads == 2
    assert np.array_equal(alone, padded)
