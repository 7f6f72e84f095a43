"""Reproductions of the DEQ papers' experiments, each runnable as ``python -m deepeq.experiments.<name>``."""
