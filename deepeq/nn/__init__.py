"""Modules: the DEQ layer and its solve policy, the per-example fixed-point cache, variational dropout, and the per-sample context for state inside f."""

from .._context import sample_index as sample_index
from .cache import FixedPointCache as FixedPointCache
from .deq import DEQ as DEQ
from .deq import SolvePolicy as SolvePolicy
from .dropout import VariationalDropout as VariationalDropout
from .dropout import reset_deq_state as reset_deq_state
