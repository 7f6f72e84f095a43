"""Theory made executable: the DEQ papers' universality constructions (Bai et al. 2019 §B, §C)."""

from .memory import saved_bytes as saved_bytes
from .universality import StackedEquilibrium as StackedEquilibrium
from .universality import WeightTiedEquivalent as WeightTiedEquivalent
from .universality import weight_tied_equivalent as weight_tied_equivalent
