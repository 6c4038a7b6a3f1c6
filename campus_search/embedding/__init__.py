"""Embedding clients: the bundled all-MiniLM-L6-v2 run in-process (``local``) and remote servers
(Ollama, OpenAI-compatible; ``remote``).

May import: the base modules only. Never ``flask``, ``api`` or ``app``.
"""
