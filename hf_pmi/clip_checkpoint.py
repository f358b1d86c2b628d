"""The checkpoint folder of a `ContinualCLIP`: what `ContinualCLIP.save_pretrained` writes and
`ContinualCLIP.from_pretrained` reads (safetensors and JSON only).

A checkpoint folder holds:

- ``continual_clip.json``: class names, templates, LoRA settings, base model (a Hub id, never a local
  path, and the commit it was loaded at), format version, and the sha256 of every file below (verified on
  load, `hf_pmi.integrity`); the file seals itself with its own sha256;
- ``class_prompts.safetensors``: the tokenised prompts (so logits need no tokenizer to reload);
- ``clip/``: a plain `CLIPModel` with the checkpoint's weights, LoRA merged and peft's
  ``modules_to_save`` copies unwrapped (`CLIPModel.from_pretrained(path, subfolder="clip")` loads it
  with no missing or unexpected key and gives the checkpoint's ``logits``; it neither routes nor uses a
  classifier head), and the processor when one was given:
  ``pipeline("zero-shot-image-classification", model=f"{path}/clip")`` predicts as the text head does with
  ``hypothesis_template`` set to the prompt template;
- ``adapter/``: the peft LoRA adapter, when there is one
  (`PeftModel.from_pretrained(base, path, subfolder="adapter")` on the base model);
- ``base/``: the frozen base under the adapter, a plain `CLIPModel`, whenever that base has no Hub
  id (a local folder, a CLIP built from a config): the checkpoint loads wherever it is moved or pushed;
- ``router/``: the `ClassRouter`, when classes are routed (`hf_pmi.routing`);
- ``head/``: the classifier head's statistics, when the model predicts with one (`hf_pmi.heads`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import CLIPModel

from .blocks import unwrap_clip
from .checkpoint import task_checksums
from .export import base_state_dict, merged_clip, peft_deprecations_silenced
from .heads import HEAD_FOLDER, ContinualHead
from .integrity import (CheckpointFileError, file_checksums, load_safetensors, read_json, sha256_file, unreadable,
                        verify_checksums, write_json)
from .model_card import write_adapter_card
from .resolve import hub_repo_id, load_pinned, resolve_pretrained_folder
from .routing import ROUTER_FOLDER, ClassRouter
from .validation import check_checkpoint_prompts

CONFIG_NAME = "continual_clip.json"
PROMPTS_NAME = "class_prompts.safetensors"
# 1: routed classes in continual_clip.json / class_prompts.safetensors; 2: in router/.
FORMAT_VERSION = 2
COMPONENTS = ("clip", "adapter", "base", ROUTER_FOLDER, HEAD_FOLDER)  # the model's subfolders of a checkpoint


def save_checkpoint(model, save_directory: str | os.PathLike, processor=None) -> None:
    """Write `model`'s checkpoint folder (module docstring); `ContinualCLIP.save_pretrained` documents it."""
    os.makedirs(save_directory, exist_ok=True)
    for name in COMPONENTS:  # no component of an earlier save in this folder survives (e.g. a stale router/)
        shutil.rmtree(os.path.join(save_directory, name), ignore_errors=True)
    base_id = model.base_model_id
    save_base = model.lora_config is not None and base_id is None
    merged_clip(model.clip).save_pretrained(os.path.join(save_directory, "clip"))
    if processor is not None:
        processor.save_pretrained(save_directory)
        processor.save_pretrained(os.path.join(save_directory, "clip"))  # clip/ alone is pipeline-ready
    if model.lora_config is not None:
        adapter_dir = os.path.join(save_directory, "adapter")
        # save_embedding_layers=False: no embedding is adapted or resized, and peft's "auto" would look the
        # base model's config up on the Hub at every save
        model.clip.save_pretrained(adapter_dir, save_embedding_layers=False)
        _record_adapter_base(adapter_dir, base_id)
        write_adapter_card(adapter_dir, base_id)  # not peft's empty template
        if save_base:  # a base without a Hub id has no other home: keep its (frozen) weights
            os.makedirs(os.path.join(save_directory, "base"), exist_ok=True)
            config = copy.deepcopy(unwrap_clip(model.clip).config)
            config._name_or_path = ""  # a local path means nothing on another machine
            config.save_pretrained(os.path.join(save_directory, "base"))
            save_file(base_state_dict(model.clip), os.path.join(save_directory, "base", "model.safetensors"),
                      metadata={"format": "pt"})
    save_file({"prompt_ids": model.prompt_ids.contiguous().cpu(), "prompt_mask": model.prompt_mask.contiguous().cpu()},
              os.path.join(save_directory, PROMPTS_NAME), metadata={"format": "pt"})
    if len(model.router):
        model.router.save_pretrained(os.path.join(save_directory, ROUTER_FOLDER))
    if model.head is not None:
        model.head.save_pretrained(os.path.join(save_directory, HEAD_FOLDER))
    checksums = {PROMPTS_NAME: sha256_file(os.path.join(save_directory, PROMPTS_NAME))}
    for name in COMPONENTS:
        if os.path.isdir(os.path.join(save_directory, name)):
            checksums.update({f"{name}/{rel}": digest
                              for rel, digest in file_checksums(os.path.join(save_directory, name)).items()})
    meta = {
        "format_version": FORMAT_VERSION,
        "class_names": model.class_names,
        "templates": model.templates,
        "lora": {**model.lora_config, "base_model_name_or_path": base_id} if model.lora_config else None,
        "base_model_name_or_path": base_id,  # a Hub id or None (then the base is in base/ or merged in clip/)
        "base_model_revision": model.base_model_revision if base_id else None,  # loaded at this commit again
        "base_saved": save_base,
        "clip_merged": True,  # clip/ holds the merged model; the LoRA base is in base/ (or base_model_name_or_path)
        "checksums": dict(sorted(checksums.items())),  # verified by from_pretrained (hf_pmi.integrity)
    }
    write_json(os.path.join(save_directory, CONFIG_NAME), meta, seal=True)  # its own sha256, verified on load


def load_checkpoint(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None, is_trainable: bool = True,
                    token: str | None = None, cache_dir: str | None = None, **kwargs):
    """Read a checkpoint folder into a `cls` (`ContinualCLIP`); `ContinualCLIP.from_pretrained` documents it."""
    if token is not None:
        kwargs["token"] = token
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    folder = resolve_pretrained_folder(path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir)
    config_file = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise ValueError(
            f"{path_or_repo_id} is not a ContinualCLIP checkpoint: it has no {CONFIG_NAME}. For a plain CLIP "
            f"model use `ContinualCLIP.from_clip({str(path_or_repo_id)!r})`."
        )
    meta = read_json(config_file)
    version = meta.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{config_file} has format version {version}, newer than this hf_pmi reads ({FORMAT_VERSION}): "
            "upgrade hf_pmi (`pip install -U hf_pmi`)."
        )
    verify_checksums(folder, _recorded_checksums(folder, meta))
    if meta["lora"] is None:
        clip = _load_clip(os.path.join(folder, "clip"), "The CLIP model", **kwargs)
    elif meta["base_saved"]:  # older checkpoints kept the base in clip/
        sub = "base" if meta.get("clip_merged") else "clip"
        clip = _load_clip(os.path.join(folder, sub), "The base CLIP model", **kwargs)
    else:
        clip, _ = load_pinned(CLIPModel, _base_model(meta["base_model_name_or_path"], folder),
                              **{**kwargs, "revision": meta.get("base_model_revision")})
    if meta["lora"] is not None:
        from peft import PeftModel

        adapter = os.path.join(folder, "adapter")
        try:
            with peft_deprecations_silenced():
                clip = PeftModel.from_pretrained(clip, adapter, is_trainable=is_trainable)
        except Exception as e:  # peft names no file of a truncated adapter
            raise unreadable("The LoRA adapter", e, adapter) from e
    model = cls(clip, templates=meta["templates"], lora_config=meta["lora"])
    model.base_model_revision = meta.get("base_model_revision")
    prompts = load_safetensors(os.path.join(folder, PROMPTS_NAME))
    check_checkpoint_prompts(meta["class_names"], meta["templates"], prompts["prompt_ids"], folder)
    model.prompt_ids, model.prompt_mask = prompts["prompt_ids"], prompts["prompt_mask"]
    model.class_names = list(meta["class_names"])
    if os.path.isdir(os.path.join(folder, ROUTER_FOLDER)):
        router = ClassRouter.from_pretrained(os.path.join(folder, ROUTER_FOLDER))
        model.route_classes(router.class_ids, router.prototypes)
    elif meta.get("routed_classes"):  # format 1: the routed classes beside the prompts
        _route_format_1(model, meta["routed_classes"], prompts.get("routed_prototypes"), folder)
    if os.path.isdir(os.path.join(folder, HEAD_FOLDER)):
        model.set_head(ContinualHead.from_pretrained(os.path.join(folder, HEAD_FOLDER)))
    return model


def _record_adapter_base(adapter_dir: str, base_id: str | None) -> None:
    """peft records the base's ``name_or_path`` in ``adapter_config.json``: keep it only when it is a Hub id
    (a local path would point nowhere on another machine; the checkpoint's ``base/`` holds that base)."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    config = read_json(path)
    if config.get("base_model_name_or_path") != base_id:
        config["base_model_name_or_path"] = base_id
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def _recorded_checksums(folder: str, meta: dict) -> dict[str, str] | None:
    """The checksums of the model's files: those in ``continual_clip.json``, or for a checkpoint written
    before the model recorded its own, the entries of the task's ``continual_state.json``."""
    if "checksums" in meta:
        return meta["checksums"]
    recorded = task_checksums(folder) or {}
    return {rel: digest for rel, digest in recorded.items() if rel == PROMPTS_NAME or rel.split("/")[0] in COMPONENTS}


def _load_clip(path: str, what: str, **kwargs) -> CLIPModel:
    """`CLIPModel.from_pretrained` of a folder of the checkpoint; a file it cannot read is named."""
    try:
        return CLIPModel.from_pretrained(path, **kwargs)
    except TypeError:
        raise  # a wrong keyword argument: the caller's, not the file's
    except Exception as e:
        raise unreadable(what, e, path) from e


def _base_model(name: str, folder: str) -> str:
    """The base model a LoRA checkpoint names (written by hf_pmi < 0.2, which recorded local paths too)."""
    if hub_repo_id(name) is None and not os.path.isdir(os.path.expanduser(name)):
        raise CheckpointFileError(
            f"{folder} is a LoRA checkpoint on the base model {name!r}, a local folder that is no longer there, and "
            f"it does not hold that base itself (checkpoints written since hf_pmi 0.2 do, in base/). Put the base "
            f"back at that path, or load the merged weights alone with "
            f"`ContinualCLIP.from_clip({os.path.join(folder, 'clip')!r}, ...)`."
        )
    return name


def _route_format_1(model, routed: list[int], prototypes: torch.Tensor | None, folder: str) -> None:
    """Routing as checkpoints of format 1 stored it (``routed_classes`` in the JSON, ``routed_prototypes``
    in the prompts file)."""
    if prototypes is None or len(prototypes) != len(routed):
        raise ValueError(
            f"{folder} routes classes {routed} but its {PROMPTS_NAME} holds "
            f"{0 if prototypes is None else len(prototypes)} routed prototypes: the files come from different "
            "checkpoints or were edited. Reload an intact copy."
        )
    model.route_classes([int(c) for c in routed], prototypes)


def task_file_checksums(folder: str) -> dict[str, str]:
    """The sha256 of every safetensors and JSON file of a task folder being written; the model's files
    are taken from its own manifest (just computed by `ContinualCLIP.save_pretrained`), not hashed twice."""
    model_files = read_json(os.path.join(folder, CONFIG_NAME)).get("checksums", {})
    sums = {**model_files, **file_checksums(folder, exclude=(CONFIG_NAME, *model_files)),
            CONFIG_NAME: sha256_file(os.path.join(folder, CONFIG_NAME))}
    return dict(sorted(sums.items()))
