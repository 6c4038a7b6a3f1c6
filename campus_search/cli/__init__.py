"""The ``campus-search`` command line: ``main`` (serve, ingest, token, eval ...), ``ops`` (backup,
restore, loadtest) and ``audit`` (verify).

The top layer with the web app: may import every component.
"""
