"""Routing: a saved component of a `ContinualCLIP` checkpoint that scores some classes by the raw CLIP.

A LoRA model carries its pre-trained CLIP (the adapters disabled). `ClassRouter` names classes
(e.g. classes learned from their names only, `hf_pmi.names_only`) that the raw CLIP scores better
than the adapted model, each with a class embedding of its own (``prototypes``, one row per routed
class, in the space of the class text embeddings). Routed, a class gets the raw CLIP's probability
and the other classes share the rest of the probability as the adapted model splits it among them
(`routed_probs`, ``combine="route"``). With ``combine="product"`` every class gets the product of the
raw CLIP's probability (over its classifier with the routed rows replaced) and the adapted model's,
renormalised (`product_probs`: a product of experts, a softer split between routed and other classes).
The model applies the router in eval mode and returns the result as ``routed_logits``
(log-probabilities); its ``logits`` are always the adapted model's.

Saved as ``router/router.json`` (the routed class ids and the combination) and
``router/router.safetensors`` (the prototypes) inside the checkpoint.

Example:
    >>> import torch
    >>> raw = torch.log(torch.tensor([[0.3, 0.3, 0.4]]))  # the raw CLIP
    >>> adapted = torch.log(torch.tensor([[0.8, 0.1, 0.1]]))  # the model; class 2 is routed
    >>> routed_probs(raw, adapted, torch.tensor([False, False, True]))
    tensor([[0.5333, 0.0667, 0.4000]])
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

ROUTER_FOLDER = "router"
CONFIG_NAME = "router.json"
WEIGHTS_NAME = "router.safetensors"
FORMAT_VERSION = 2  # 2: "combine" (a version-1 file routes)
COMBINES = ("route", "product")
# A class with zero probability keeps a finite log-probability, so argmax and CE stay defined.
MIN_PROB = 1e-30


def routed_probs(raw_logits: torch.Tensor, logits: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """Class probabilities (B, C): the `routed` classes (a (C,) bool mask) take the raw CLIP's
    probability, the others share the raw CLIP's remaining mass as `logits` split it among them."""
    raw = F.softmax(raw_logits, -1)
    kept = F.softmax(logits.masked_fill(routed, float("-inf")), -1)
    return torch.where(routed, raw, raw.masked_fill(routed, 0.0).sum(1, keepdim=True) * kept)


def product_probs(raw_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (B, C) proportional to the product of the raw CLIP's and the adapted model's.

    Example:
        >>> raw = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
        >>> adapted = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
        >>> product_probs(raw, adapted)
        tensor([[0.4000, 0.2000, 0.4000]])
    """
    return F.softmax(F.log_softmax(raw_logits, -1) + F.log_softmax(logits, -1), -1)


class ClassRouter(nn.Module):
    """The routed classes of a model and their class embeddings in the raw CLIP (module docstring)."""

    def __init__(self, dim: int, class_ids: list[int] | None = None, prototypes: torch.Tensor | None = None,
                 combine: str = "route"):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {list(COMBINES)}, got {combine!r}.")
        self.combine = combine
        self.class_ids: list[int] = []
        self.register_buffer("prototypes", torch.zeros(0, dim))
        if class_ids:
            self.add(class_ids, prototypes)

    def __len__(self) -> int:
        return len(self.class_ids)

    def add(self, class_ids: list[int], prototypes: torch.Tensor, num_classes: int | None = None) -> None:
        """Route `class_ids`, with `prototypes` ``(len(class_ids), dim)`` as their class embeddings."""
        class_ids = [int(c) for c in class_ids]
        dim = self.prototypes.shape[1]
        if tuple(prototypes.shape) != (len(class_ids), dim):
            raise ValueError(f"Expected prototypes of shape ({len(class_ids)}, {dim}), got {tuple(prototypes.shape)}.")
        out_of_range = num_classes is not None and any(not 0 <= c < num_classes for c in class_ids)
        if out_of_range or set(class_ids) & set(self.class_ids) or len(set(class_ids)) < len(class_ids):
            raise ValueError(f"Cannot route classes {class_ids}: the model has {num_classes} classes and routes "
                             f"{self.class_ids} already.")
        self.class_ids = self.class_ids + class_ids
        self.prototypes = torch.cat([self.prototypes, prototypes.detach().to(self.prototypes)])

    def classifier(self, raw_text: torch.Tensor) -> torch.Tensor:
        """The raw CLIP's classifier (C, P): its class text embeddings with the routed rows replaced by the prototypes."""
        classifier = raw_text.float().clone()
        classifier[self.class_ids] = F.normalize(self.prototypes.float(), dim=-1)
        return classifier

    def forward(self, raw_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, C) from the raw CLIP's logits over `classifier` and the adapted model's `logits`."""
        if self.combine == "product":
            return (F.log_softmax(raw_logits.float(), -1) + F.log_softmax(logits.float(), -1)).log_softmax(-1).to(
                logits.dtype)
        routed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        routed[self.class_ids] = True
        return routed_probs(raw_logits.float(), logits.float(), routed).clamp_min(MIN_PROB).log().to(logits.dtype)

    # ----- save / load -------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``router.json`` and ``router.safetensors`` into `folder`."""
        os.makedirs(folder, exist_ok=True)
        save_file({"prototypes": self.prototypes.contiguous().cpu()}, os.path.join(folder, WEIGHTS_NAME),
                  metadata={"format": "pt"})
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump({"format": "hf_pmi.ClassRouter", "version": 1 if self.combine == "route" else FORMAT_VERSION,
                       "class_ids": self.class_ids, "combine": self.combine}, f, indent=2)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "ClassRouter":
        """Read what `save_pretrained` wrote (the two files must describe the same classes)."""
        config_path = os.path.join(folder, CONFIG_NAME)
        with open(config_path) as f:
            config = json.load(f)
        if config.get("format") != "hf_pmi.ClassRouter" or config.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{config_path} is not a ClassRouter of format version <= {FORMAT_VERSION}; upgrade hf_pmi.")
        prototypes = load_file(os.path.join(folder, WEIGHTS_NAME))["prototypes"]
        if len(prototypes) != len(config["class_ids"]):
            raise ValueError(
                f"{folder} routes classes {config['class_ids']} but holds {len(prototypes)} prototypes: the files come "
                "from different checkpoints or were edited. Reload an intact copy."
            )
        return cls(prototypes.shape[1], config["class_ids"], prototypes, config.get("combine", "route"))
