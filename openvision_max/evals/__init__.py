"""Evaluation: zero-shot classification and retrieval over converted datasets, run by the train loop."""
