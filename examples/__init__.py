"""End-to-end recipes built on dsjax, train and eval, run from the repository root as
`python -m examples.NAME` (the notebook, quickstart.ipynb, beside them)."""
