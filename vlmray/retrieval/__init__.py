"""Embedding and FAISS retrieval indexes; see the open issues."""
