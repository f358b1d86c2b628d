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
def require(ok: bool, name: str, value, rule: str, fix: str = "") -> None:
    """Raise `ValidationError` naming the setting `name`, its `value`, the `rule` it breaks and the `fix`.

    Example:
        >>> require(True, "learning_rate", 1e-3, "> 0")
        >>> require(False, "learning_rate", 0.0, "> 0", "Try 1e-3.")
        Traceback (most recent call last):
        ...
        hf_pmi.validation.ValidationError: learning_rate=0.0 is invalid: it must be > 0. Try 1e-3.
    """
    if not ok:
        raise ValidationError(f"{name}={value!r} is invalid: it must be {rule}.{(' ' + fix) if fix else ''}")


def finite(x) -> bool:
    """True for a finite int or float (not a bool, NaN or inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def require_weight(name: str, value) -> None:
    """A loss weight: finite and >= 0."""
    require(finite(value) and value >= 0, name, value, ">= 0 (a loss weight)")


def require_count(name: str, value, minimum: int = 1, meaning: str = "") -> None:
    """An integer >= `minimum`."""
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, name, value,
            f"an integer >= {minimum}{meaning}")


def require_positive(name: str, value, meaning: str = "") -> None:
    """A finite number > 0."""
    require(finite(value) and value > 0, name, value, f"> 0{meaning}")


def check_training_settings(args, trains: bool = True) -> None:
    """Numbers of a `ContinualConfig` that would fail late or silently."""
    if trains:
        require_positive("learning_rate", args.learning_rate)
        require(args.per_device_train_batch_size >= 1, "per_device_train_batch_size",
                args.per_device_train_batch_size, ">= 1")
        if args.max_steps <= 0:
            require(finite(args.num_train_epochs) and args.num_train_epochs > 0, "num_train_epochs",
                    args.num_train_epochs, "> 0", "Or set max_steps (steps per task) > 0.")
    require(args.per_device_eval_batch_size >= 1, "per_device_eval_batch_size", args.per_device_eval_batch_size,
            ">= 1")


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
