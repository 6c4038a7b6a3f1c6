"""The query embedding: the shipped graph (float32 products) against the int8 query graph (quantized.py).

    .venv/bin/python bench/bench_query_graph.py [--queries 400] [--compare]

Both embed the same SciFact train questions, one at a time on one thread, taking turns query by query;
each question twice: as asked, and with bench_peer.py's uniqueness suffix (" (r0o1-N)", ~8 more tokens).
Prints the CPU time per query (median and mean) of each graph and the cosine of each int8 query vector to
the shipped graph's vector of the same text (min and mean). ``--compare`` adds four variants not shipped:
the GELUs as exported (five nodes a layer: the recipe until 2026-12-02 03:30 UTC; docs/performance.md,
"Where the last target stands"), and from "A fused attention, rare postings summed as read" the recipe
before that (the same products, attention as exported and onnxruntime's fused skip layer norm: until
2026-12-01 12:00 UTC), every layer's feed-forward down projection float32 with it (until 10:14 UTC), and
int8 everywhere (fused).
One JSON line last. The derived graphs are kept in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCIFACT = Path(os.environ.get("SCIFACT_DIR") or ROOT.parent / "shared/data/scifact")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--compare", action="store_true",
                    help="also four variants not shipped (the previous recipes, int8 everywhere)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from campus_search.embedding import quantized
    from campus_search.embedding.local import LocalMiniLM

    if not quantized.cpu_has_vnni():
        print("note: this CPU has no VNNI; EMBEDDING_QUERY_INT8=auto would keep the float32 graph here")
    lines = (SCIFACT / "queries-train.jsonl").read_text(encoding="utf-8").splitlines()
    asked = [json.loads(line)["text"] for line in lines if line.strip()][:args.queries]
    tmp = Path(tempfile.mkdtemp(prefix="bench-query-graph-"))
    model = LocalMiniLM(threads=1, query_int8=True, cache_dir=tmp)
    model.warm()
    graphs: dict[str, Any] = {"shipped": model.session, "int8": model._session("int8")}
    if args.compare:
        import onnxruntime as ort

        # (name, float32 down projections, attention fused and the session without SkipLayerNormFusion,
        # GELUs fused)
        for name, layers, fused, gelu in (("GELU as exported", 1, True, False), ("previous recipe", 1, False, False),
                                          ("all down float32", 6, False, False), ("int8 everywhere", 0, True, True)):
            path = tmp / f"keep-{layers}-{fused}-{gelu}.onnx"
            quantized.derive(model.model_path, path, keep_layers=layers, fuse=fused, gelu=gelu)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            graphs[name] = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"],
                disabled_optimizers=list(quantized.SESSION_DISABLED_OPTIMIZERS) if fused else [])
    models = {name: (lambda texts, s=session: model._embed(s, texts, 1)) for name, session in graphs.items()}
    report: dict[str, dict[str, float]] = {}
    for label, texts in (("as asked", asked), ("with the bench suffix", [f"{q} (r0o1-{i})" for i, q in
                                                                         enumerate(asked)])):
        for text in texts[:10]:
            for embed in models.values():
                embed([text])
        cpu: dict[str, list[float]] = {name: [] for name in models}
        vectors: dict[str, list[np.ndarray]] = {name: [] for name in models}
        for text in texts:
            for name, embed in models.items():
                start = time.thread_time()
                vectors[name].append(embed([text])[0])
                cpu[name].append((time.thread_time() - start) * 1000)
        shipped = np.stack(vectors["shipped"])
        print(f"\n{label} ({len(texts)} queries)")
        for name in models:
            cosine = (np.stack(vectors[name]) * shipped).sum(axis=1)
            row = {"cpu_ms_median": round(statistics.median(cpu[name]), 2),
                   "cpu_ms_mean": round(statistics.mean(cpu[name]), 2),
                   "cosine_min": round(float(cosine.min()), 4), "cosine_mean": round(float(cosine.mean()), 4)}
            report[f"{label}: {name}"] = row
            print(f"  {name:16s} CPU {row['cpu_ms_median']:6.2f} ms median {row['cpu_ms_mean']:6.2f} mean   "
                  f"cosine to shipped min {row['cosine_min']:.4f} mean {row['cosine_mean']:.4f}")
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **report}))


if __name__ == "__main__":
    main()
