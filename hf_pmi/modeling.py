"""`ContinualCLIP`: a CLIP model whose classifier is the text embedding of every class seen so far.

Logits are ``logit_scale * norm(image_features) @ norm(class_text_embeddings).T`` where a class's
text embedding is the normalised mean, over prompt templates, of the normalised text features of
``template.format(class_name)``. `add_classes` appends new classes as tasks arrive. The patch
embedding is always frozen: replay samples live right after it (see `hf_pmi.blocks`).

Outputs (`ContinualCLIPOutput`): ``logits`` are always those scaled cosines of the adapted model,
in training and in eval mode. A model with a router (`route_classes`, `hf_pmi.routing`: classes
learned from their names only, scored by the raw CLIP) also returns ``routed_logits`` in eval mode:
the log-probabilities of the routed classifier, one more pass through the vision tower with the
adapters disabled. Predict with ``routed_logits`` when it is set, else with ``logits``
(`ContinualCLIPOutput.prediction_logits`).

A model with a classifier head (`set_head`, `hf_pmi.heads`: ``ncm``, ``ranpac``) also returns
``head_logits`` in eval mode, which ``prediction_logits`` returns unless the model routed. `save_pretrained`
/ `from_pretrained` write and read the checkpoint folder described in `hf_pmi.clip_checkpoint`.

Example:
    >>> from hf_pmi import ContinualCLIP
    >>> from hf_pmi.testing import build_clip, build_tokenizer
    >>> model = ContinualCLIP.from_clip(build_clip("tiny"), class_names=["cat", "dog"], tokenizer=build_tokenizer())
    >>> model.num_classes
    2
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel
from transformers.utils import ModelOutput

from .blocks import VisionBlocks, unwrap_clip
from .clip_checkpoint import COMPONENTS, CONFIG_NAME, FORMAT_VERSION, PROMPTS_NAME, load_checkpoint, save_checkpoint
from .export import is_peft, peft_deprecations_silenced
from .heads import ContinualHead
from .resolve import hub_api, hub_repo_id, keep_local_name, load_pinned
from .routing import ClassRouter
from .validation import (ValidationError, check_class_names, check_distinct_prompts, check_local_path,
                         check_templates)

__all__ = ["COMPONENTS", "CONFIG_NAME", "FORMAT_VERSION", "PROMPTS_NAME", "ContinualCLIP", "ContinualCLIPOutput"]

DEFAULT_TEMPLATES = ["a bad photo of a {}."]  # the reference's single prompt template
DEFAULT_LORA_TARGETS = r".*vision_model.*\.(q_proj|v_proj)"  # vision tower only (peft has no CLIP default)


@dataclass
class ContinualCLIPOutput(ModelOutput):
    """Output of `ContinualCLIP.forward`.

    ``logits`` / ``image_embeds`` are those of the real images (``pixel_values``), ``replay_*``
    those of the replayed patch maps, ``text_embeds`` the normalised class embeddings (C, P);
    ``pooled_embeds`` / ``replay_pooled_embeds`` the pooled features (before the projection) that a
    classifier head reads; ``head_logits`` the head's scores of the real images (eval mode with a head,
    `hf_pmi.heads`); ``routed_logits`` the routed log-probabilities of the real images (eval mode with a
    router).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    routed_logits: torch.Tensor | None = None
    head_logits: torch.Tensor | None = None
    replay_logits: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    replay_image_embeds: torch.Tensor | None = None
    pooled_embeds: torch.Tensor | None = None
    replay_pooled_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None

    @property
    def prediction_logits(self) -> torch.Tensor | None:
        """What to predict with: ``routed_logits`` when the model routed, else ``head_logits`` when it has a
        classifier head, else ``logits``."""
        for logits in (self.routed_logits, self.head_logits):
            if logits is not None:
                return logits
        return self.logits


def class_text_embeddings(clip: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """(C, P) class embeddings of tokenised prompts (C, T, L): per class, the L2-normalised mean over its
    T templates of the normalised text features."""
    c, t, length = prompt_ids.shape
    out = unwrap_clip(clip).get_text_features(
        input_ids=prompt_ids.view(c * t, length), attention_mask=prompt_mask.view(c * t, length)
    )
    return F.normalize(F.normalize(out.pooler_output, dim=-1).view(c, t, -1).mean(1), dim=-1)


class ContinualCLIP(nn.Module):
    """CLIP for class-incremental learning (see the module docstring).

    Build it with `from_clip` (a `CLIPModel`, a Hub id or a local folder) or reload a checkpoint
    with `from_pretrained`.
    """

    main_input_name = "pixel_values"
    base_model_revision: str | None = None  # the commit of a Hub base it was loaded at (saved; loaded again)

    def __init__(self, clip: nn.Module, templates: list[str] | None = None, lora_config: dict | None = None):
        super().__init__()
        self.clip = clip
        self.templates = list(templates or DEFAULT_TEMPLATES)
        check_templates(self.templates)
        self.class_names: list[str] = []
        self.lora_config = lora_config
        length = self.clip_config.text_config.max_position_embeddings
        self.register_buffer("prompt_ids", torch.zeros(0, len(self.templates), length, dtype=torch.long))
        self.register_buffer("prompt_mask", torch.zeros(0, len(self.templates), length, dtype=torch.long))
        self.router = ClassRouter(self.clip_config.projection_dim)
        # None: the text head (`hf_pmi.heads`). Not a registered submodule: its statistics are saved in head/, not in
        # the model's state dict, and DDP does not broadcast them at every step (every process holds the same head)
        object.__setattr__(self, "head", None)
        self._text_cache: torch.Tensor | None = None
        self._raw_classifier: torch.Tensor | None = None
        base = unwrap_clip(self.clip)
        base.vision_model.embeddings.patch_embedding.requires_grad_(False)  # replay lives after it
        base.logit_scale.requires_grad_(False)  # the pre-trained temperature; KD terms are scaled by it

    # ----- construction ----------------------------------------------------------------------
    @classmethod
    def from_clip(
        cls,
        clip: str | os.PathLike | CLIPModel,
        class_names: list[str] | None = None,
        tokenizer=None,
        templates: list[str] | None = None,
        lora=None,
        **from_pretrained_kwargs,
    ) -> "ContinualCLIP":
        """Wrap a `CLIPModel` (or load one by Hub id / local folder), optionally with LoRA.

        Args:
            clip: a `CLIPModel`, or what `CLIPModel.from_pretrained` accepts.
            class_names, tokenizer: classes to start with (more come with `add_classes`).
            templates: prompt templates with one ``{}`` for the class name.
            lora: a `peft.LoraConfig`. Without ``target_modules`` it adapts the vision tower's
                ``q_proj`` / ``v_proj``; name text-tower modules to adapt the text tower too. Its
                weights are drawn from torch's global generator: call `transformers.set_seed`
                first for a reproducible run.
        """
        revision = None  # the commit of a Hub base (load_pinned: safetensors only); a local path is made absolute
        if not isinstance(clip, nn.Module):
            check_local_path(clip, "CLIP model folder")  # a missing folder is not a bad Hub id
            clip, revision = load_pinned(CLIPModel, clip, **from_pretrained_kwargs)
        keep_local_name(unwrap_clip(clip).config)
        lora_dict = None
        if lora is not None:
            from peft import get_peft_model

            if lora.target_modules is None:
                lora.target_modules = DEFAULT_LORA_TARGETS
            check_modules_to_save(clip, lora.modules_to_save)
            with peft_deprecations_silenced():
                clip = get_peft_model(clip, lora)
            lora_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in lora.to_dict().items()}  # JSON lists
        model = cls(clip, templates=templates, lora_config=lora_dict)
        model.base_model_revision = revision
        if class_names:
            if tokenizer is None:
                raise ValueError("Pass `tokenizer=` (e.g. `processor.tokenizer`) to encode the class names.")
            model.add_classes(class_names, tokenizer)
        return model

    @property
    def clip_config(self) -> CLIPConfig:
        return unwrap_clip(self.clip).config

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def blocks(self) -> VisionBlocks:
        """The vision tower as blocks (patch embedding, pre, layers, post); shares the weights."""
        return VisionBlocks(self.clip)

    @property
    def has_adapters(self) -> bool:
        """True for a LoRA (peft) model: its adapters disabled give the raw, pre-trained CLIP."""
        return is_peft(self.clip)

    @property
    def routed_classes(self) -> list[int]:
        """Class ids scored by the raw CLIP at inference (`route_classes`)."""
        return list(self.router.class_ids)

    @property
    def feature_dim(self) -> int:
        """Size of the pooled features a classifier head reads (the vision tower's hidden size)."""
        return self.clip_config.vision_config.hidden_size

    @property
    def head_name(self) -> str:
        """The classifier the model predicts with: ``text`` or the head's name (`hf_pmi.heads`)."""
        return "text" if self.head is None else self.head.name

    def set_head(self, head: ContinualHead | None) -> None:
        """Predict with `head` (a `hf_pmi.heads.ContinualHead` on `feature_dim` features; None: the text head).
        Routed classes (names only) have no image statistics: a model that routes keeps the text head."""
        if head is not None and len(self.router):
            raise ValueError(
                f"This model routes classes {self.routed_classes} learned from their names only; they have no image "
                f"statistics for the {head.name} head. Use head='text' for names-only classes."
            )
        if head is not None and head.feature_dim != self.feature_dim:
            raise ValueError(f"The head reads {head.feature_dim}-dim features but the model's are {self.feature_dim}.")
        object.__setattr__(self, "head", head.to(self.prompt_ids.device) if head is not None else None)

    @torch.no_grad()
    def pooled_features(self, pixel_values: torch.Tensor | None = None, replay_inputs: torch.Tensor | None = None,
                        replay_block: int = 1) -> torch.Tensor:
        """The pooled features (B, hidden) of images or replayed inputs: what a classifier head reads."""
        blocks = self.blocks
        if pixel_values is not None:
            x = blocks.forward_from(0, pixel_values, end=replay_block)
        else:
            x = replay_inputs.to(blocks.embeddings.patch_embedding.weight.dtype)
        return blocks.post_layernorm(blocks.forward_from(replay_block, x, end=blocks.num_blocks - 1)[:, 0])

    @contextlib.contextmanager
    def raw_clip(self):
        """The raw (pre-trained) CLIP: this model's CLIP with its peft adapters disabled. A model without
        adapters is refused: its pre-trained weights are gone."""
        if not self.has_adapters:
            raise ValueError(
                "This needs the raw pre-trained CLIP, but the model was trained without adapters, so its "
                "pre-trained weights are gone. Train with LoRA (`ContinualCLIP.from_clip(clip, lora=LoraConfig(...))`)."
            )
        with self.clip.disable_adapter():
            yield self.clip

    def tokenize_classes(self, names: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenised prompts ``(C, T, L)`` (ids, attention mask) of `names` with this model's templates."""
        length = self.prompt_ids.shape[-1]
        texts = [t.format(name) for name in names for t in self.templates]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        shape = (len(names), len(self.templates), length)
        return enc["input_ids"].view(shape), enc["attention_mask"].view(shape)

    def add_classes(self, names: list[str], tokenizer) -> list[int]:
        """Append classes (by name) to the classifier; returns their class ids."""
        clash = sorted(set(names) & set(self.class_names)) or sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(
                f"Class name(s) {clash} already exist in this model (it knows {self.num_classes} classes). Class "
                f"names must be unique because they are the classifier: rename the new classes, e.g. with a suffix."
            )
        check_class_names(names)
        ids, mask = self.tokenize_classes(names, tokenizer)
        check_distinct_prompts(self.class_names + list(names), torch.cat([self.prompt_ids.cpu(), ids]),
                               self.prompt_ids.shape[-1])
        device = self.prompt_ids.device
        self.prompt_ids = torch.cat([self.prompt_ids, ids.to(device)])
        self.prompt_mask = torch.cat([self.prompt_mask, mask.to(device)])
        first = self.num_classes
        self.class_names.extend(names)
        self._text_cache = self._raw_classifier = None
        return list(range(first, self.num_classes))

    def route_classes(self, class_ids: list[int], prototypes: torch.Tensor) -> None:
        """Score `class_ids` at inference by the raw CLIP with `prototypes` (one row per class, in the
        space of the class text embeddings, e.g. `hf_pmi.names_only.text_space_prototypes`) as their
        class embeddings (`hf_pmi.routing`). Needs LoRA: the raw CLIP is the model with its adapters disabled.

        Example:
            >>> import torch
            >>> from peft import LoraConfig
            >>> from hf_pmi.testing import build_clip, build_tokenizer
            >>> model = ContinualCLIP.from_clip(build_clip("tiny"), lora=LoraConfig(r=4), class_names=["a", "b"],
            ...                                 tokenizer=build_tokenizer())
            >>> model.route_classes([1], torch.randn(1, model.clip_config.projection_dim))
            >>> model.routed_classes
            [1]
        """
        if not self.has_adapters:
            raise ValueError(
                "Routing classes to the raw CLIP needs a LoRA model (its adapters disabled give the raw CLIP): "
                "build it with `ContinualCLIP.from_clip(clip, lora=LoraConfig(...))`."
            )
        self.router.add(class_ids, prototypes, self.num_classes)
        self._raw_classifier = None

    # ----- forward -----------------------------------------------------------------------------
    def _text_tower_trainable(self) -> bool:
        base = unwrap_clip(self.clip)
        params = list(base.text_model.parameters()) + list(base.text_projection.parameters())
        return any(p.requires_grad for p in params)

    def text_embeddings(self) -> torch.Tensor:
        """Normalised class embeddings (C, P), cached while the text tower is frozen."""
        if self.num_classes == 0:
            raise RuntimeError("The model has no classes yet: call `add_classes` first.")
        frozen = not self._text_tower_trainable()
        if frozen and self._text_cache is not None and self._text_cache.device == self.prompt_ids.device:
            return self._text_cache
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            emb = class_text_embeddings(self.clip, self.prompt_ids, self.prompt_mask)
        if frozen:
            self._text_cache = emb.detach()
        return emb

    @torch.no_grad()
    def _route(self, inputs: torch.Tensor, block: int, logits: torch.Tensor) -> torch.Tensor:
        """The router's log-probabilities for images entering `block` as `inputs`, whose adapted logits
        are `logits`. The blocks below `block` are frozen, so the raw CLIP shares them."""
        with self.raw_clip() as clip:  # the raw CLIP: its weights never change, so its classifier is cached
            raw = F.normalize(VisionBlocks(clip).forward_from(block, inputs), dim=-1)
            if self._raw_classifier is None or self._raw_classifier.device != raw.device:
                raw_text = class_text_embeddings(clip, self.prompt_ids, self.prompt_mask)
                self._raw_classifier = self.router.classifier(raw_text)
        return self.router(self.logit_scale * raw.float() @ self._raw_classifier.t(), logits)

    @property
    def logit_scale(self) -> torch.Tensor:
        return unwrap_clip(self.clip).logit_scale.exp()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        replay_inputs: torch.Tensor | None = None,
        replay_block: int = 1,
        **kwargs,
    ) -> ContinualCLIPOutput:
        """Classify images over all seen classes; replayed samples join the same pass.

        ``replay_inputs`` are inputs of vision block ``replay_block`` (`hf_pmi.blocks`): patch maps
        (B, D, g, g) for block 1, right after the frozen patch embedding, or tokens (B, N, D) entering
        encoder layer k - 2 for block k >= 2. Real images run through the blocks below it first, then
        both share one pass through the rest of the tower (one DDP forward). In eval mode a model with
        routed classes also returns ``routed_logits`` (module docstring).
        """
        blocks = self.blocks
        inputs = []
        if pixel_values is not None:
            inputs.append(blocks.forward_from(0, pixel_values, end=replay_block))
        if replay_inputs is not None:
            inputs.append(replay_inputs.to(blocks.embeddings.patch_embedding.weight.dtype))
        if not inputs:
            raise ValueError("Pass `pixel_values` and/or `replay_inputs`.")
        hidden = blocks.forward_from(replay_block, torch.cat(inputs), end=blocks.num_blocks - 1)
        pooled = blocks.post_layernorm(hidden[:, 0])
        feats = F.normalize(blocks.visual_projection(pooled), dim=-1)
        text = self.text_embeddings()
        scale = self.logit_scale
        logits = scale * feats @ text.t()
        n = inputs[0].shape[0] if pixel_values is not None else 0
        image_logits = logits[:n] if pixel_values is not None else None
        routed = head_logits = None
        if image_logits is not None and len(self.router) and not self.training and self.has_adapters:
            routed = self._route(inputs[0], replay_block, image_logits)
        if image_logits is not None and self.head is not None and not self.training:
            self.head.check_ready(self.num_classes)
            head_logits = self.head.to(pooled.device)(pooled[:n].detach())
        out = ContinualCLIPOutput(
            logits=image_logits,
            routed_logits=routed,
            head_logits=head_logits,
            pooled_embeds=pooled[:n] if pixel_values is not None else None,
            replay_pooled_embeds=pooled[n:] if replay_inputs is not None else None,
            replay_logits=logits[n:] if replay_inputs is not None else None,
            image_embeds=feats[:n] if pixel_values is not None else None,
            replay_image_embeds=feats[n:] if replay_inputs is not None else None,
            text_embeds=text,
            logit_scale=scale,
        )
        if labels is not None and out.logits is not None:
            out.loss = F.cross_entropy(out.logits, labels)
        return out

    # ----- save / load -------------------------------------------------------------------------
    @property
    def base_model_id(self) -> str | None:
        """The Hub id of the pre-trained CLIP under this model; None when it has none (a local folder, a CLIP
        built from a config, a cached backbone): a LoRA checkpoint then keeps that base's weights in ``base/``."""
        return hub_repo_id(unwrap_clip(self.clip).config._name_or_path)

    def save_pretrained(self, save_directory: str | os.PathLike, processor=None, **kwargs) -> None:
        """Write the checkpoint folder described in `hf_pmi.clip_checkpoint` (safetensors + JSON).

        With `processor` (the `CLIPProcessor`), it is saved at the top of the folder and in ``clip/``, so
        that ``pipeline("zero-shot-image-classification", model=f"{folder}/clip")`` works as it is. The
        checkpoint is self-contained: a base without a Hub id is written to ``base/``, and no local path
        is recorded anywhere. ``continual_clip.json`` records the sha256 of every file written here,
        which `from_pretrained` verifies.
        """
        save_checkpoint(self, save_directory, processor)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        processor=None,
        revision: str | None = None,
        token: str | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        endpoint: str | None = None,
    ):
        """Upload the `save_pretrained` folder (with `processor`, if given) to `repo_id` (created if needed) at
        `revision` (a branch, created from `main` if missing); `from_pretrained(repo_id, revision=..., token=...)`
        reloads it. Returns the `huggingface_hub.CommitInfo`.

        Example:
            >>> model.push_to_hub("me/clip-digits", revision="task-4")  # doctest: +SKIP
            >>> ContinualCLIP.from_pretrained("me/clip-digits", revision="task-4")  # doctest: +SKIP
        """
        import tempfile

        api = hub_api(token, endpoint)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)  # the Hub does not create it on upload
        with tempfile.TemporaryDirectory(prefix="hf_pmi_push_") as folder:
            self.save_pretrained(folder, processor=processor)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or "hf_pmi: upload ContinualCLIP")

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        revision: str | None = None,
        is_trainable: bool = True,
        *,
        token: str | None = None,
        cache_dir: str | None = None,
        **kwargs,
    ) -> "ContinualCLIP":
        """Reload a checkpoint written by `save_pretrained` (a local folder or a Hub repo + revision).

        The checksums recorded in the checkpoint are verified before any weight is read: a changed,
        truncated or missing file raises `hf_pmi.integrity.CheckpointFileError` naming it and the fix.
        `token` and `cache_dir` serve the download of the checkpoint and of a base model it names;
        other keyword arguments go to `CLIPModel.from_pretrained`.
        """
        return load_checkpoint(cls, path_or_repo_id, revision, is_trainable, token=token, cache_dir=cache_dir, **kwargs)


def check_modules_to_save(clip: nn.Module, names: list[str] | None) -> None:
    """Each of peft's ``modules_to_save`` must name a module of the CLIP (peft silently ignores one that does not)."""
    modules = [name for name, _ in clip.named_modules()]
    unknown = [m for m in names or [] if not any(n == m or n.endswith("." + m) for n in modules)]
    if unknown:
        raise ValidationError(
            f"LoRA modules_to_save {unknown} match no module of the CLIP model, so nothing would be trained for "
            f"them. Name modules as `model.named_modules()` lists them, e.g. 'text_projection', "
            f"'visual_projection' or 'vision_model.post_layernorm'."
        )
