"""Evaluation: tasks, verifiers, metrics and `python -m eval`."""
