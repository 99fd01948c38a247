"""clara: CLaRa (continuous latent reasoning for RAG) as a library. No import-time side effects."""

__version__ = "0.1.0"
