"""Embedding clients: the interface and the token-counting rule (``base``), the bundled all-MiniLM-L6-v2
run in-process (``local``), remote servers (Ollama, OpenAI-compatible; ``remote``), and which one a
configuration means (``factory``).

May import: the base modules only. Never ``flask``, ``api`` or ``app``.
"""
