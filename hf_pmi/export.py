"""Plain `CLIPModel` weights out of a peft-wrapped CLIP, for checkpoints that `transformers` loads.

peft renames what it wraps: a LoRA layer keeps its weights under ``<name>.base_layer.*`` next to
``lora_A`` / ``lora_B``, and a ``modules_to_save`` module holds ``<name>.original_module.*`` and the
trained copy ``<name>.modules_to_save.<adapter>.*``. A state dict with these keys loads into a
`CLIPModel` with missing and unexpected keys (and re-initialised weights). Two exports undo it:

- `merged_clip`: the model as it predicts, LoRA merged into the weights and each
  ``modules_to_save`` module replaced by its trained copy (a `CLIPModel`, a deep copy);
- `base_state_dict`: the frozen base under peft (LoRA dropped, the original of each
  ``modules_to_save`` module), with plain `CLIPModel` keys, for continuing with the adapter.

Example:
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from hf_pmi.export import base_state_dict, merged_clip
    >>> from hf_pmi.testing import build_clip
    >>> clip = build_clip("tiny")
    >>> peft_clip = get_peft_model(build_clip("tiny"), LoraConfig(r=2, target_modules=["q_proj"],
    ...                                                            modules_to_save=["text_projection"]))
    >>> sorted(base_state_dict(peft_clip)) == sorted(clip.state_dict())
    True
    >>> type(merged_clip(peft_clip)).__name__
    'CLIPModel'
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings

import torch
from torch import nn

from .blocks import unwrap_clip

_LORA = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


@contextlib.contextmanager
def peft_deprecations_silenced():
    """Silence the FutureWarning transformers v5 raises when peft reads `is_gradient_checkpointing`
    (peft's call, not the user's: nothing for them to change)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def is_peft(model: nn.Module) -> bool:
    """True for a peft `PeftModel` (what `ContinualCLIP.from_clip(..., lora=...)` wraps the CLIP in)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def merged_clip(model: nn.Module) -> nn.Module:
    """A plain `CLIPModel` that computes what `model` (a CLIP, peft-wrapped or not) computes.

    The input is left untouched: a peft model is deep-copied, then merged and unwrapped.
    """
    if not is_peft(model):
        return unwrap_clip(model)
    with peft_deprecations_silenced():
        merged = copy.deepcopy(model).merge_and_unload()  # LoRA merged, modules_to_save -> their trained copy
    return unwrap_clip(merged)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights under a peft CLIP, with the keys of a plain `CLIPModel` (see module doc)."""
    state = {}
    for key, value in unwrap_clip(model).state_dict().items():
        if _LORA.search(key) or ".modules_to_save." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        state[key] = value.detach().contiguous().cpu()
    return state
