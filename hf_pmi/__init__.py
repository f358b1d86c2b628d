"""hf_pmi: data-free continual learning of CLIP by per-layer model inversion (PMI).

Data -> task splits (`split_class_incremental`) -> `ContinualTrainer` (train, evaluate, collect
statistics, invert, replay) -> per-task checkpoint / feature bank / model card -> Hub.
"""

from .version import __version__
from .bank import FeatureBank
from .config import ContinualConfig
from .data import ContinualCollator, ContinualTask, ContinualTasks, split_class_incremental
from .inversion import InversionConfig
from .metrics import continual_metrics
from .modeling import ContinualCLIP
from .methods.pmi import PMIConfig
from .trainer import ContinualResult, ContinualTrainer

__all__ = [
    "ContinualCLIP",
    "ContinualCollator",
    "ContinualConfig",
    "ContinualResult",
    "ContinualTask",
    "ContinualTasks",
    "ContinualTrainer",
    "FeatureBank",
    "InversionConfig",
    "PMIConfig",
    "__version__",
    "continual_metrics",
    "split_class_incremental",
]
