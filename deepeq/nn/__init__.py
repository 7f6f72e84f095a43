"""Modules: the DEQ layer (and, later, shared blocks for the model zoo)."""

from .deq import DEQ as DEQ
