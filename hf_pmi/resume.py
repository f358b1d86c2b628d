"""Resuming a continual run exactly where it stopped, and refusing to overwrite one by accident.

A task checkpoint records, besides the weights: which parameters were trainable, a fingerprint
of the data set, and the run's settings. Resuming restores the trainable set exactly (a reloaded
model would otherwise train everything), and refuses a checkpoint of another method, task count,
class list or data set. Every task starts from a seed derived from the run's seed and the task
index, so a resumed task replays the same random numbers as in an uninterrupted run.

Example:
    >>> resume_request("true"), resume_request("false"), resume_request("runs/x/task-2")
    (True, None, 'runs/x/task-2')
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil

import numpy as np

from .checkpoint import RESULTS_NAME, finished_tasks
from .log import get_logger
from .validation import ValidationError

logger = get_logger()

_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0", "none", ""}


def resume_request(value) -> bool | str | None:
    """`resume_from_checkpoint` as the command line gives it ("true", "false", a path) -> True / None / path."""
    if value is None or value is False:
        return None
    if value is True:
        return True
    text = str(value).strip()
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return None
    return os.fspath(value)


def prepare_output_dir(output_dir: str, resume, overwrite: bool) -> None:
    """Refuse to write over finished tasks unless asked to resume or to overwrite (then clear them)."""
    done = finished_tasks(output_dir)
    if not done or resume:
        return
    if not overwrite:
        raise ValidationError(
            f"output_dir {output_dir!r} already holds finished tasks ({', '.join(done)}). To continue that run pass "
            f"resume_from_checkpoint=True (--resume_from_checkpoint true); to start again and replace them pass "
            f"overwrite_output_dir=True (--overwrite_output_dir true); or choose another --output_dir."
        )
    for name in os.listdir(output_dir):
        if name.startswith("task-") or name == RESULTS_NAME:
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    logger.warning("overwrite_output_dir: removed the earlier tasks %s from %s.", done, output_dir)


# ----- the trainable set -------------------------------------------------------------------------
def trainable_parameter_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def restore_trainable(model, names: list[str] | None, where: str) -> None:
    """Make exactly the parameters `names` trainable (as they were when the checkpoint was written)."""
    if names is None:
        return  # a checkpoint of an older version: keep what the model loaded with
    wanted = set(names)
    params = dict(model.named_parameters())
    missing = sorted(wanted - set(params))
    if missing:
        raise ValidationError(
            f"{where} lists trainable parameters that this model does not have ({missing[:3]}...): the checkpoint "
            f"belongs to another architecture or LoRA setting. Resume with the same model settings."
        )
    for name, p in params.items():
        p.requires_grad_(name in wanted)


# ----- data fingerprint --------------------------------------------------------------------------
def _update_with_split(digest, ds, image_column: str, label_column: str) -> None:
    if ds is None:
        digest.update(b"none")
        return
    digest.update(repr(ds.features).encode())
    if not hasattr(ds, "__len__"):
        return  # streaming: reading rows here would consume the stream
    labels = np.asarray(ds.select_columns([label_column]).with_format("numpy")[label_column]).astype(np.int64)
    digest.update(str(len(ds)).encode())
    digest.update(labels.tobytes())
    if len(ds):
        from datasets import Image

        raw = ds.select([0, len(ds) - 1]).select_columns([image_column])
        if isinstance(raw.features[image_column], Image):
            raw = raw.cast_column(image_column, Image(decode=False))
        for row in raw:
            digest.update(_image_bytes(row[image_column]))


def _image_bytes(value) -> bytes:
    """The encoded bytes of an undecoded image (its file's content when only a path is stored)."""
    if not isinstance(value, dict):
        return repr(value).encode()
    if value.get("bytes"):
        return value["bytes"]
    path = value.get("path") or ""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read()
    return path.encode()


def dataset_fingerprint(tasks) -> str:
    """A short hash of the tasks' data: class names, row counts, labels, the first and last image of each split."""
    digest = hashlib.sha256()
    digest.update(repr(tasks.class_names).encode())
    for task in tasks:
        _update_with_split(digest, task.train, tasks.image_column, tasks.label_column)
        _update_with_split(digest, task.test, tasks.image_column, tasks.label_column)
    return digest.hexdigest()[:16]  # 64 bits: enough to tell data sets apart


def check_resume_consistency(state: dict, trainer, folder: str) -> None:
    """A checkpoint resumes only the run it came from: same method, task count, classes and data."""
    args, tasks = trainer.args, trainer.tasks
    fix = ("Resume with the settings of the interrupted run, or start a new run with --overwrite_output_dir true "
           "or another --output_dir.")
    if state.get("method") != args.method:
        raise ValidationError(f"{folder} was trained with method {state.get('method')!r}, this run uses "
                              f"{args.method!r}. {fix}")
    if state.get("num_tasks") != trainer.num_total_tasks:
        raise ValidationError(f"{folder} belongs to a run of {state.get('num_tasks')} tasks, this run has "
                              f"{trainer.num_total_tasks}. {fix}")
    saved = state.get("tasks", {})
    if saved.get("class_names") != tasks.class_names:
        raise ValidationError(f"{folder} was trained on classes {saved.get('class_names')}, this run has "
                              f"{tasks.class_names}. {fix}")
    if saved.get("class_order") != tasks.class_order:
        raise ValidationError(
            f"{folder} was trained with class order {saved.get('class_order')}, but these tasks use "
            f"{tasks.class_order}: resume with the same data, seed and split."
        )
    recorded = state.get("dataset_fingerprint")
    if recorded is not None and recorded != trainer.dataset_fingerprint:
        raise ValidationError(f"{folder} was trained on another data set (fingerprint {recorded}, this run's "
                              f"{trainer.dataset_fingerprint}): its images, labels or split differ. {fix}")


# ----- the model ---------------------------------------------------------------------------------
_ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_LORA_KEYS = ("r", "lora_alpha", "target_modules", "modules_to_save")


def _architecture(config: dict) -> dict:
    """What makes two CLIPs the same architecture, from a `CLIPConfig` as a dict."""
    out = {f"{tower}.{key}": config.get(f"{tower}_config", {}).get(key)
           for tower in ("vision", "text") for key in _ARCHITECTURE}
    vision = config.get("vision_config", {})
    return {**out, "vision.image_size": vision.get("image_size"), "vision.patch_size": vision.get("patch_size"),
            "projection_dim": config.get("projection_dim")}


def _lora(lora: dict | None) -> dict | None:
    if not lora:
        return None
    normal = {k: lora.get(k) for k in _LORA_KEYS}
    for key in ("target_modules", "modules_to_save"):  # peft stores lists as sets (JSON: lists in any order)
        value = normal[key]
        if isinstance(value, str) and value.startswith("{"):  # a set written by str() (hf_pmi < 0.2)
            value = ast.literal_eval(value)
        normal[key] = sorted(value) if isinstance(value, (list, tuple, set)) else value
    return normal


def check_same_model(model, folder: str) -> None:
    """A resumed run must build the model of the interrupted run: the checkpoint's architecture and LoRA
    settings (resuming otherwise continued the checkpoint's model, silently ignoring the new settings)."""
    from .integrity import read_json

    saved = _architecture(read_json(os.path.join(folder, "clip", "config.json")))
    built = _architecture(model.clip_config.to_dict())
    diff = {k: (saved[k], built[k]) for k in saved if saved[k] != built[k]}
    saved_lora = _lora(read_json(os.path.join(folder, "continual_clip.json")).get("lora"))
    if saved_lora != _lora(model.lora_config):
        diff["lora"] = (saved_lora, _lora(model.lora_config))
    if diff:
        shown = "; ".join(f"{k}: checkpoint {a}, this run {b}" for k, (a, b) in diff.items())
        raise ValidationError(
            f"{folder} holds another model than this run builds ({shown}). Resume with the model settings of the "
            f"interrupted run (e.g. the same --model_size, --model_name_or_path, --lora_r), or start a new run with "
            f"--overwrite_output_dir true or another --output_dir."
        )
