"""Stabilisation toolkit: fixed-point correction, Jacobian penalty and its schedule, spectral radius, weight/spectral norm."""

from .correction import FixedPointCorrection as FixedPointCorrection
from .jacobian import jacobian_penalty as jacobian_penalty
from .jacobian import spectral_radius as spectral_radius
from .jacobian import unconverged_mask as unconverged_mask
from .norm import spectral_norm as spectral_norm
from .norm import weight_norm as weight_norm
from .schedule import JacobianSchedule as JacobianSchedule
