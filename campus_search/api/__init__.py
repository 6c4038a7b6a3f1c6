"""The web layer: Flask blueprints (search, documents, explain, statistics, cache, operations, OpenAPI),
one JSON error shape, rate limits, CORS, the per-request metrics and access log (``instrumentation``)
and the search audit hook (``auditing``).

The top layer with ``app`` and ``cli``: may import every component and the web framework; nothing below
imports it (tests/test_architecture.py).
"""
