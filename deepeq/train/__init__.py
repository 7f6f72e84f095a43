"""Training system: configs, the training loop, evaluation."""

from .checkpoint import load_run as load_run
from .config import ConfigError as ConfigError
from .config import TrainConfig as TrainConfig
from .config import dump_config as dump_config
from .config import load_config as load_config
from .config import load_run_config as load_run_config
from .loop import evaluate as evaluate
from .loop import train as train
from .step import Skip as Skip
from .step import StepResult as StepResult
from .step import train_step as train_step
