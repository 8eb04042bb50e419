"""Datasets as Task objects that yield conversations, for the chat stages' training mixtures and evals."""
