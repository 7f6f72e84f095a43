"""Datasets and task generators (plain tensors / torch Datasets)."""

from .copy_memory import copy_memory as copy_memory
