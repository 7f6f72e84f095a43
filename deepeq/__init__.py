"""deepeq: Deep Equilibrium Models in PyTorch."""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from ._fixed_point import fixed_point as fixed_point
from ._solution import BackwardStats as BackwardStats
from ._solution import ConvergenceWarning as ConvergenceWarning
from ._solution import Solution as Solution
from ._solution import Stats as Stats
from ._solution import Status as Status
from ._test_time import PathIndependence as PathIndependence
from ._test_time import Restarts as Restarts
from ._test_time import fixed_point_restarts as fixed_point_restarts
from ._test_time import path_independence as path_independence
from .backward import AbstractBackward as AbstractBackward
from .backward import ImplicitBackward as ImplicitBackward
from .backward import PhantomBackward as PhantomBackward
from .backward import ReversibleBackward as ReversibleBackward
from .backward import UnrolledBackward as UnrolledBackward
from .nn import DEQ as DEQ
from .regularization import FixedPointCorrection as FixedPointCorrection
from .regularization import JacobianSchedule as JacobianSchedule
from .regularization import jacobian_penalty as jacobian_penalty
from .regularization import spectral_norm as spectral_norm
from .regularization import spectral_radius as spectral_radius
from .regularization import unconverged_mask as unconverged_mask
from .regularization import weight_norm as weight_norm
from .solvers import SOLVERS as SOLVERS
from .solvers import AbstractSolver as AbstractSolver
from .solvers import Anderson as Anderson
from .solvers import Broyden as Broyden
from .solvers import Picard as Picard
from .solvers import Reversible as Reversible
from .solvers import make_solver as make_solver

try:
    __version__ = _version("deepeq")
except _PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+unknown"
