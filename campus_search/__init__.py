"""Campus Search: permission-aware semantic search for a university's documents."""

__version__ = "0.1.0"
