"""The model zoo: ``create_model(name, **overrides)``, ``list_models()``."""

from . import baselines as baselines
from . import deq_llama as deq_llama
from . import deq_transformer as deq_transformer
from . import mdeq as mdeq
from . import trellisnet as trellisnet
from ._core import Core as Core
from ._migrate import migrate_state_dict as migrate_state_dict
from ._protocol import EquilibriumModel as EquilibriumModel
from ._protocol import equilibrium_layer as equilibrium_layer
from ._registry import ModelEntry as ModelEntry
from ._registry import create_model as create_model
from ._registry import list_models as list_models
from ._registry import model_config as model_config
from ._registry import register_model as register_model
from ._sequence import SequenceModel as SequenceModel
from ._solve import SolveSpec as SolveSpec
