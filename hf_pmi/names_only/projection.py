"""Semantic-aware projection (method.md, "new classes from names only"): pseudo image features of a
new class, in the raw (pre-trained) CLIP's feature space, from old classes that are close in meaning.

1. text prototypes: ``a_k`` of each old class, ``b`` of the new name, each the L2-normalised mean of
   the raw CLIP's normalised text features over the model's prompt templates (`raw_text_prototypes`);
2. the ``K`` old classes with the highest cosine ``a_k . b`` (`nearest_classes`);
3. ``m`` samples of each neighbour's raw-feature Gaussian, L2-normalised and rotated from ``a_k`` to
   ``b`` in the plane the two span (`rotate_toward`);
4. the average over the neighbours (matched by sample index), normalised and shifted toward the text
   prototype: ``t = norm((1 - gamma) * avg + gamma * b)`` (`project_name`).

Example:
    >>> import torch
    >>> a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    >>> rotate_toward(a[None], a, b)
    tensor([[0., 1., 0.]])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..blocks import unwrap_clip
from ..modeling import class_text_embeddings
from ..routing import routed_probs


@torch.no_grad()
def raw_text_prototypes(clip, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """(C, P) class embeddings of the raw CLIP (`hf_pmi.modeling.class_text_embeddings`), float, on its device."""
    device = unwrap_clip(clip).logit_scale.device
    return class_text_embeddings(clip, prompt_ids.to(device), prompt_mask.to(device)).float()


def rotate_toward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotate the rows of `x` (n, P) by the rotation that takes unit vector `a` onto unit vector `b`
    in the plane they span; components orthogonal to that plane are unchanged. ``a == b``: identity.
    (``a == -b`` leaves the plane undefined; the identity is returned there too.)"""
    cos = torch.dot(a, b).clamp(-1.0, 1.0)
    v = b - cos * a
    sin = v.norm()
    if sin < eps:
        return x.clone()
    v = v / sin
    xa, xv = x @ a, x @ v
    rest = x - xa[:, None] * a - xv[:, None] * v
    return (cos * xa - sin * xv)[:, None] * a + (sin * xa + cos * xv)[:, None] * v + rest


def nearest_classes(old_prototypes: torch.Tensor, new_prototype: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` old classes whose text prototypes have the highest cosine with the new one."""
    return (old_prototypes @ new_prototype).topk(min(k, old_prototypes.shape[0])).indices


def project_name(raw_means: torch.Tensor, raw_stds: torch.Tensor, old_prototypes: torch.Tensor,
                 new_prototype: torch.Tensor, neighbours: int = 5, per_class: int = 20, gamma: float = 0.1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(per_class, P) unit-norm pseudo image features of a new class (steps 2-4 of the module docstring)."""
    idx = nearest_classes(old_prototypes, new_prototype, neighbours)
    rotated = []
    for k in idx.tolist():
        noise = torch.randn(per_class, raw_means.shape[1], generator=generator)
        s = F.normalize(raw_means[k] + raw_stds[k] * noise, dim=-1)
        rotated.append(rotate_toward(s, old_prototypes[k], new_prototype))
    avg = F.normalize(torch.stack(rotated).mean(0), dim=-1)
    return F.normalize((1 - gamma) * avg + gamma * new_prototype, dim=-1)


def text_space_prototypes(projected: torch.Tensor, old_means: torch.Tensor, old_text: torch.Tensor) -> torch.Tensor:
    """Class embeddings (N, P) for the raw CLIP's classifier from the mean projected features
    `projected` (N, P) of new classes: CLIP's image features sit apart from its text features (the
    modality gap), so the old classes' mean gap (normalised image mean `old_means` minus text
    prototype `old_text`) is taken off, and the new rows compete with the old text rows on equal terms.

    Example:
        >>> old_means, old_text = torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0]])
        >>> text_space_prototypes(torch.tensor([[0.0, 1.0, 1.0]]), old_means, old_text)
        tensor([[0.3827, 0.9239, 0.0000]])
    """
    gap = (F.normalize(old_means, dim=-1) - old_text).mean(0)
    return F.normalize(F.normalize(projected, dim=-1) - gap, dim=-1)


def boundary_target(raw_logits: torch.Tensor, old_logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """Class probabilities (B, C) that take old-vs-new from the raw CLIP and old-vs-old from the model
    before the task: ``p[new] = raw[new]``, ``p[old] = raw[old].sum() * previous[old]``.

    The raw CLIP (``raw_logits``, all C classes) knows the new names from its pre-training; the
    previous model (``old_logits``, its ``n_old`` classes) knows the old classes better than the raw CLIP.

    Example:
        >>> raw = torch.log(torch.tensor([[0.3, 0.3, 0.4]]))  # two old classes, one new
        >>> old = torch.log(torch.tensor([[0.9, 0.1]]))
        >>> boundary_target(raw, old, n_old=2)
        tensor([[0.5400, 0.0600, 0.4000]])
    """
    c = raw_logits.shape[1]
    routed = torch.arange(c, device=raw_logits.device) >= n_old
    return routed_probs(raw_logits, F.pad(old_logits[:, :n_old], (0, c - n_old)), routed)

