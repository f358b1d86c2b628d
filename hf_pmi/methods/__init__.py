"""Registry of continual methods: each is one small class with its config, in one module of this package.

`METHODS` maps a name (``--method``) to its class; ``METHODS[name].config_class`` is its config
(`hf_pmi.methods.base` explains the hooks). Built in:

| name | module | config |
|---|---|---|
| `finetune`, `joint`, `zero_shot` | `baselines` | `MethodConfig` (no settings) |
| `lwf` | `lwf` | `LwFConfig` |
| `feature_replay` | `feature_replay` | `FeatureReplayConfig` |
| `pmi`, `full_inversion` | `pmi` | `PMIConfig` |
| `exemplar_replay` | `exemplar_replay` | `ExemplarReplayConfig` |

Example:
    >>> from hf_pmi.methods import METHODS
    >>> METHODS["pmi"].config_class.__name__, METHODS["lwf"].config_class().temperature
    ('PMIConfig', 2.0)
"""

from .base import METHODS, ContinualMethod, MethodConfig, TaskPlan, method_class, register_method
from . import baselines, exemplar_replay, feature_replay, lwf, pmi  # noqa: E402,F401  (they register themselves)

__all__ = ["METHODS", "ContinualMethod", "MethodConfig", "TaskPlan", "method_class", "register_method"]
