"""Per-task checkpoints of a BN-family run (`hf_pmi.resnet.continual.learn_tasks` with ``output_dir``).

``output_dir/task-{t}/`` holds, once task t is finished:

- ``config.json``, ``model.safetensors``: the model (`save_pretrained`; loads with ``from_pretrained``);
- ``replay_state.safetensors``: the learner's tensors (replay pool, relation-KD projections, random state);
- ``feature_bank/``: the class Gaussians (inverting methods);
- ``continual_state.json`` (`hf_pmi.checkpoint.STATE_NAME`): settings, tasks, accuracy matrix, timings
  and the sha256 of every other safetensors and JSON file, verified before anything is loaded;
- ``preprocessor_config.json``: the image processor, when the run was given one;
- ``README.md`` and ``accuracy_matrix.png``: the model card.

The folder is written as ``task-{t}.tmp`` and renamed into place (`hf_pmi.checkpoint.task_folder_writer`, the CLIP
family's writer too), so a crash leaves either the whole
task or none of it (a half-written ``.tmp`` is ignored and overwritten). Nothing here unpickles.

Example:
    >>> import tempfile, torch
    >>> from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    >>> model = ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=2))
    >>> out = tempfile.mkdtemp()
    >>> state = {"task_id": 0, "num_tasks": 2, "method": "finetune", "accuracy_matrix": [[1.0, None]],
    ...          "task_classes": [[0, 1], [2, 3]]}
    >>> folder = save_task(out, model, {"pool_y": torch.zeros(0, dtype=torch.long)}, state)
    >>> loaded_state, tensors = load_task(folder)
    >>> loaded_state["task_id"], sorted(tensors)
    (0, ['pool_y'])
"""

from __future__ import annotations

import json
import os

import torch
from huggingface_hub import ModelCardData
from safetensors.torch import save_file

from ..checkpoint import STATE_NAME, read_state, task_folder_writer, write_json
from ..integrity import file_checksums, load_safetensors, verify_checksums
from ..metrics import a_last_scope, format_matrix
from ..model_card import card_tags, plot_accuracy_matrix, render_card

FORMAT = "hf_pmi.resnet.task"
REPLAY_STATE_NAME = "replay_state.safetensors"
BANK_DIR = "feature_bank"
CARD_TEMPLATE = "resnet_continual.md"


def save_task(output_dir: str, model, tensors: dict[str, torch.Tensor], state: dict, bank=None,
              repo_id: str | None = None, processor=None) -> str:
    """Write finished task ``state["task_id"]`` into ``output_dir/task-{t}`` atomically; returns the folder.
    With `processor` (an image processor) the folder also serves ``pipeline("image-classification", folder)``."""
    with task_folder_writer(output_dir, state["task_id"]) as tmp:  # the folder appears whole or not at all
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(tmp, REPLAY_STATE_NAME),
                  metadata={"format": "pt"})
        if bank is not None and bank.num_classes:
            bank.save_pretrained(os.path.join(tmp, BANK_DIR))
        state = {"format": FORMAT, **state, "checksums": file_checksums(tmp)}
        write_json(os.path.join(tmp, STATE_NAME), state)
        _write_card(tmp, model, state, bank is not None and bank.num_classes > 0, repo_id)
    return os.path.join(output_dir, f"task-{state['task_id']}")


def load_task(folder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The state and learner tensors of a finished task folder, after verifying every recorded checksum."""
    state = read_state(folder)
    if state.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a task folder of a BN-family run (format {state.get('format')!r}, expected "
                         f"{FORMAT!r}): resume it with the tool that wrote it, or start in an empty --output_dir.")
    verify_checksums(folder, state.get("checksums"))
    return state, load_safetensors(os.path.join(folder, REPLAY_STATE_NAME))


# The settings a BN card shows (ResNetContinualConfig fields), in this order.
CARD_SETTINGS = ("method", "schedule", "epochs", "later_epochs", "stage_epochs", "stage_lrs", "head_epochs", "head_lr",
                 "batch_size", "lr", "shift", "flip", "crop_fill", "regenerate", "selection", "replay_per_class",
                 "init_samples", "per_task_samples", "weights", "loss_form", "target_classes", "head_counts", "last_stage",
                 "seed")


def _write_card(folder: str, model, state: dict, has_bank: bool, repo_id: str | None) -> None:
    matrix, t = state["accuracy_matrix"], state["task_id"]
    plot_accuracy_matrix(matrix, state["num_tasks"], os.path.join(folder, "accuracy_matrix.png"))
    method = state["method"]
    inverts = method in ("pmi", "full_inversion")
    data_free = None if method == "joint" else method != "exemplar_replay"
    tags = ["hf_pmi", "continual-learning", "class-incremental", "image-classification"]
    tags += card_tags(method, data_free, inverts, lora=False)  # the method and what the run did: as CLIP cards
    data = ModelCardData(library_name="transformers", pipeline_tag="image-classification", license="other", tags=tags)
    seen = sum(len(c) for c in state["task_classes"][: t + 1])
    rows = [[a for a in row if a is not None] for row in matrix]
    config = state.get("settings", {}).get("config", {})
    text = render_card(
        data, CARD_TEMPLATE, title=f"{type(model).__name__}: {method}, after task {t}",
        architecture=type(model).__name__, method=method, data_free=data_free, inverts=inverts,
        inversion_summary="per-layer chain over the residual blocks, then a full refinement" if method == "pmi"
        else "a random start (DeepInversion-style)", regenerate=config.get("regenerate", False),
        task_id=t, tasks_done=t + 1, num_tasks=state["num_tasks"], num_seen_classes=seen, repo_id=repo_id,
        matrix_table="```\n" + format_matrix(rows) + "\n```",
        a_last=f"{state.get('a_last', 0.0):.3f}", a_last_scope=a_last_scope([j for j in range(t + 1) if matrix[-1][j] is None]), a_avg=f"{state.get('a_avg', 0.0):.3f}",
        load_path=repo_id or f"path/to/task-{t}", revision=f"task-{t}" if repo_id else None,
        image_size=getattr(model.config, "image_size", "H"), has_bank=has_bank,
        settings=[(k, json.dumps(config[k])) for k in CARD_SETTINGS if k in config],
    )
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)
