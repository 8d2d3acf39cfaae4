"""Retrieval: the two-tower model and the Faiss index of item vectors."""
