"""Backward rules: how gradients flow through a fixed point."""

from ._base import AbstractBackward as AbstractBackward
from ._implicit import ImplicitBackward as ImplicitBackward
from ._phantom import PhantomBackward as PhantomBackward
from ._reversible import ReversibleBackward as ReversibleBackward
from ._unrolled import UnrolledBackward as UnrolledBackward
