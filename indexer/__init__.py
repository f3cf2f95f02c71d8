"""Vector store (Parquet), FAISS index and search over an index directory."""
