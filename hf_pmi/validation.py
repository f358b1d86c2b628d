"""Checks that run before any training step, so that a bad input fails in seconds, not after a task.

Every check raises `ValidationError` (a `ValueError`) whose message names what is wrong and how to
fix it. The trainer calls `validate_trainer` from its constructor; `split_class_incremental`,
`ContinualCLIP` and `FeatureBank` call the checks that belong to them.

Example:
    >>> from hf_pmi.validation import check_templates
    >>> check_templates(["a photo of a {}."])
    >>> check_templates(["a photo"])
    Traceback (most recent call last):
    ...
    hf_pmi.validation.ValidationError: Prompt template 'a photo' has no '{}' ...
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np


class ValidationError(ValueError):
    """A setting or an input cannot work; the message says why and what to change."""


# ----- prompts ---------------------------------------------------------------------------------
def check_templates(templates: list[str]) -> None:
    """Each prompt template must hold exactly one ``{}`` (where the class name goes)."""
    if not templates:
        raise ValidationError("No prompt template given: pass at least one, e.g. templates=['a photo of a {}.'].")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValidationError(
                f"Prompt template {template!r} has no '{{}}' (or more than one): every class would get the same "
                f"prompt. Put exactly one '{{}}' where the class name goes, e.g. 'a photo of a {{}}.'."
            )
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise ValidationError(
                f"Prompt template {template!r} cannot be formatted ({type(e).__name__}: {e}): keep only the one "
                f"'{{}}' and write other braces doubled ('{{{{', '}}}}')."
            ) from None


def check_checkpoint_prompts(class_names: list[str], templates: list[str], prompt_ids, where: str) -> None:
    """A checkpoint's class list, templates and tokenised prompts must agree (one row per class)."""
    shape = tuple(prompt_ids.shape)
    if len(shape) != 3 or shape[0] != len(class_names) or shape[1] != len(templates):
        raise ValidationError(
            f"{where} is inconsistent: it lists {len(class_names)} class names and {len(templates)} template(s) "
            f"but holds prompts of shape {shape} (expected ({len(class_names)}, {len(templates)}, length)). The "
            f"class list or the prompts were edited or come from different checkpoints: reload an intact copy."
        )


# ----- paths -----------------------------------------------------------------------------------
def looks_like_local_path(name: str) -> bool:
    """True when `name` can only be a file system path, never a Hub id ('namespace/name')."""
    name = os.fspath(name)
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in name or name in (".", ".."):
        return True
    if name.count("/") > 1 or name.endswith("/"):
        return True  # a Hub id has exactly one '/'
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)  # 'runs/task-3' next to an existing 'runs/'


def check_local_path(name, what: str = "folder") -> None:
    """Raise `FileNotFoundError` for a missing local path, instead of letting it pass as a bad Hub id."""
    name = os.fspath(name)
    if looks_like_local_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(
            f"No {what} at {name!r} (resolved to {os.path.abspath(os.path.expanduser(name))}, current directory "
            f"{os.getcwd()}). Check the path for typos; a Hub repo id has the form 'namespace/name'."
        )


def check_output_dir_writable(output_dir: str) -> None:
    """Create `output_dir` if needed and prove that a file can be written there."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".hf_pmi_write_test_", dir=output_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValidationError(
            f"Cannot write to output_dir {output_dir!r} ({type(e).__name__}: {e}); every task writes a checkpoint "
            f"there. Choose a writable folder (--output_dir) or fix its permissions."
        ) from None


# ----- settings --------------------------------------------------------------------------------
def _require(ok: bool, name: str, value, rule: str, fix: str = "") -> None:
    if not ok:
        raise ValidationError(f"{name}={value!r} is invalid: it must be {rule}.{(' ' + fix) if fix else ''}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_training_settings(args, trains: bool = True, replays: bool = False) -> None:
    """Numbers of a `ContinualConfig` that would fail late or silently."""
    if trains:
        _require(_finite(args.learning_rate) and args.learning_rate > 0, "learning_rate", args.learning_rate, "> 0")
        _require(args.per_device_train_batch_size >= 1, "per_device_train_batch_size",
                 args.per_device_train_batch_size, ">= 1")
        if args.max_steps <= 0:
            _require(_finite(args.num_train_epochs) and args.num_train_epochs > 0, "num_train_epochs",
                     args.num_train_epochs, "> 0", "Or set max_steps (steps per task) > 0.")
        for name in ("l_ce", "l_hkd", "l_tkd", "l_ft", "lwf_alpha"):
            value = getattr(args, name)
            _require(_finite(value) and value >= 0, name, value, ">= 0 (a loss weight)")
        _require(_finite(args.lwf_temperature) and args.lwf_temperature > 0, "lwf_temperature",
                 args.lwf_temperature, "> 0")
    _require(args.per_device_eval_batch_size >= 1, "per_device_eval_batch_size", args.per_device_eval_batch_size,
             ">= 1")
    _require(args.keep_replay_samples >= 0, "keep_replay_samples", args.keep_replay_samples, ">= 0 (0: no grid)")
    if replays:
        _require(args.replay_batch_size >= 1, "replay_batch_size", args.replay_batch_size,
                 ">= 1: every real batch is joined by this many replayed samples",
                 "Use a method without replay (e.g. --method finetune) to train without them.")


def check_inversion_settings(config) -> None:
    """Settings of `hf_pmi.inversion.InversionConfig` that would be silently 0 or fail after task 0."""
    positive_int = ["per_class", "boost", "cfs_batch", "coarse_size"]
    if config.mode == "pmi":
        positive_int += ["layer_steps", "first_block_steps"]
        for name in ("layer_lr",):
            value = getattr(config, name)
            _require(_finite(value) and value > 0, name, value, "> 0")
    else:
        positive_int += ["full_steps"]
        _require(_finite(config.full_lr) and config.full_lr > 0, "full_lr", config.full_lr, "> 0")
    for name in positive_int:
        value = getattr(config, name)
        _require(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
    _require(isinstance(config.refine_steps, int) and config.refine_steps >= 0, "refine_steps", config.refine_steps,
             ">= 0 (0: no refinement)")
    if config.refine_steps > 0 or config.mode == "full":
        _require(_finite(config.refine_lr) and config.refine_lr > 0, "refine_lr", config.refine_lr, "> 0")
    for name in ("a_layer", "alpha_rf", "alpha_tv"):
        value = getattr(config, name)
        if name == "a_layer" and value is None:  # None: the reference's alpha_rf x number of blocks
            continue
        _require(_finite(value) and value >= 0, name, value, ">= 0 (a loss weight)")
    for name in ("refine_t_max", "full_t_max"):
        value = getattr(config, name)
        _require(isinstance(value, int) and value >= 0, name, value, "an integer >= 0 (0: the stage's own steps)")
    _require(_finite(config.rho) and 0 < config.rho <= 1, "rho", config.rho, "in (0, 1] (an acceptance ratio)")
    _require(_finite(config.tau) and config.tau > 0, "tau", config.tau, "> 0 (a temperature)")
    if config.mode == "pmi":
        bad = [s for s in config.upsample_at if not 0 < s < config.first_block_steps]
        _require(not bad, "upsample_at", list(config.upsample_at),
                 f"steps strictly between 0 and first_block_steps={config.first_block_steps}",
                 "Lower them, or raise first_block_steps.")


# ----- data ------------------------------------------------------------------------------------
def _label_array(ds, label_column: str) -> np.ndarray | None:
    """The label column of a map-style dataset (read alone, images untouched); None when streaming."""
    if not hasattr(ds, "__len__"):
        return None
    return np.asarray(ds.select_columns([label_column]).with_format("numpy")[label_column]).astype(np.int64)


def _classlabel_names(ds, label_column: str) -> list[str] | None:
    from datasets import ClassLabel

    feature = (ds.features or {}).get(label_column)
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def check_labels_match_names(train, label_column: str, names: list[str], class_names_given: bool) -> None:
    """Every label has a name, every name has training examples, and `class_names` fits the ClassLabel."""
    feature_names = _classlabel_names(train, label_column)
    if class_names_given and feature_names is not None and len(feature_names) != len(names):
        raise ValidationError(
            f"class_names has {len(names)} names but the label column {label_column!r} is a ClassLabel of "
            f"{len(feature_names)} classes ({feature_names}). Give one name per label, in label order, or leave "
            f"class_names out to use the ClassLabel's names."
        )
    labels = _label_array(train, label_column)
    if labels is None:
        return  # streaming: labels are only seen while training (the collator names unknown ones)
    present = np.unique(labels)
    unnamed = [int(y) for y in present if not 0 <= y < len(names)]
    if unnamed:
        raise ValidationError(
            f"Label(s) {unnamed} of the training data have no class name: there are {len(names)} names, for labels "
            f"0..{len(names) - 1}. Give one name per label (class_names=[...]) or fix the label column."
        )
    empty = [names[c] for c in range(len(names)) if c not in set(present.tolist())]
    if empty:
        raise ValidationError(
            f"Class(es) {empty} have no training examples (an empty class folder, or more class names than "
            f"labels). Add images for them, or remove them: drop the empty folder or the extra names."
        )


def align_test_labels(test, train, label_column: str, names: list[str]):
    """Test data whose labels mean the same classes as the training labels, matched by class name.

    A test split may number its classes differently (its own ClassLabel order): its labels are
    rewritten to the training ids of the same names. A test class that is not a training class is
    an error (it could never be predicted), as is a test label without a name.
    """
    from datasets import ClassLabel

    test_names = _classlabel_names(test, label_column)
    labels = _label_array(test, label_column)
    # names are matched as the data sets spell them (class_names=... may rename the training classes)
    reference = _classlabel_names(train, label_column) or list(names)
    if test_names is None or test_names == reference:
        if labels is not None:
            unnamed = sorted({int(y) for y in labels if not 0 <= y < len(names)})
            if unnamed:
                raise ValidationError(
                    f"Test label(s) {unnamed} are not training classes (labels 0..{len(names) - 1}). Remove those "
                    f"rows from the test split or add training data for them."
                )
        return test
    present = set(range(len(test_names))) if labels is None else {int(y) for y in np.unique(labels)}
    unknown = sorted(test_names[y] for y in present if test_names[y] not in reference)
    if unknown:
        ids = sorted(test_names.index(n) for n in unknown)
        raise ValidationError(
            f"Test class(es) {unknown} do not occur in the training data, so they can never be predicted. Remove "
            f"them from the test split, e.g. `test.filter(lambda y: y not in {ids}, input_columns={label_column!r})`, "
            f"or add training images for them."
        )
    mapping = np.array([reference.index(n) if n in reference else -1 for n in test_names], dtype=np.int64)
    feature = ClassLabel(names=list(names))
    if labels is not None:
        return test.remove_columns([label_column]).add_column(label_column, mapping[labels].tolist(), feature=feature)
    features = test.features.copy()
    features[label_column] = feature
    return test.map(lambda y: {label_column: int(mapping[y])}, input_columns=[label_column], features=features)


def check_test_split(data, test_split) -> None:
    """A named test split must exist (a typo would silently leave the accuracy matrix empty)."""
    if test_split and test_split not in data:
        raise ValidationError(
            f"No {test_split!r} split in {list(data)}: without test data every accuracy would be None. Name the "
            f"test split with test_split= (--test_split), or pass test_split=None to train without evaluation."
        )


# ----- the whole run ---------------------------------------------------------------------------
def validate_trainer(trainer) -> None:
    """Everything a `ContinualTrainer` can check before its first step (called by its constructor)."""
    from .methods.pmi import PMI

    method = trainer.method
    replays = hasattr(method, "buffer") or hasattr(method, "bank")  # draws replay_batch_size samples per step
    check_training_settings(trainer.args, trains=method.trains, replays=replays)
    if isinstance(method, PMI) and type(method).after_task is PMI.after_task:  # it inverts the model
        check_inversion_settings(method.inversion)
    elif isinstance(method, PMI):  # keeps per_class real samples (exemplar replay)
        _require(method.inversion.per_class >= 1, "per_class", method.inversion.per_class, "an integer >= 1")
    model = trainer.accelerator.unwrap_model(trainer.model)
    check_templates(model.templates)
    check_checkpoint_prompts(model.class_names, model.templates, model.prompt_ids, "The model")
