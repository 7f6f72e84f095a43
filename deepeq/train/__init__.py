"""Training system: configs, the training loop, evaluation."""

from .config import ConfigError as ConfigError
from .config import TrainConfig as TrainConfig
from .config import dump_config as dump_config
from .config import load_config as load_config
from .loop import evaluate as evaluate
from .loop import train as train
