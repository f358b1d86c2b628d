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

import difflib
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


def check_class_names(names: list, where: str = "The class names") -> None:
    """Every class needs a name: CLIP classifies by it (an empty name gives every such class the same prompt)."""
    empty = [i for i, name in enumerate(names) if not isinstance(name, str) or not name.strip()]
    if empty:
        raise ValidationError(
            f"{where} of label(s) {empty} are empty ({[names[i] for i in empty]}): CLIP classifies by class name, "
            f"so every class needs one. Pass class_names=[...] (one per label) or fix the dataset's ClassLabel names."
        )


def check_distinct_prompts(names: list[str], prompt_ids, max_length: int) -> None:
    """Different classes must get different tokenised prompts: the tokenizer cuts every prompt to
    `max_length` tokens, and names that differ only beyond that cut would become one classifier row."""
    rows: dict[bytes, list[str]] = {}
    for name, ids in zip(names, prompt_ids.reshape(len(names), -1)):
        rows.setdefault(ids.numpy().tobytes(), []).append(name)
    same = [group for group in rows.values() if len(group) > 1]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValidationError(
            f"Class name(s) {repeated} occur more than once: each class needs a name of its own (CLIP classifies by "
            f"name, so two classes with one name could never be told apart). Rename them, e.g. with class_names=[...] "
            f"or by fixing the dataset's ClassLabel names, such as '{repeated[0]} (1)' and '{repeated[0]} (2)'; if they "
            f"are one class, merge their labels."
        )
    if same:
        raise ValidationError(
            f"Class names {same[0]} give identical prompts once the tokenizer cuts every prompt to {max_length} tokens: "
            f"they differ only after the cut{f' ({len(same)} such groups)' if len(same) > 1 else ''}, so the model could "
            f"not tell them apart. Make them differ early: put the distinguishing words first (rename the classes "
            f"with class_names=[...]), or use a shorter prompt template (--template 'a {{}}.') so that more of each "
            f"name fits."
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


def check_processor_fits(image_processor, image_size: int, where: str = "The model") -> None:
    """The image processor must make images of the size the model takes (a checkpoint continued or resumed
    with another processor would otherwise fail at the first batch with a tensor-size error)."""
    from PIL import Image

    probe = Image.new("RGB", (image_size + 7, image_size + 3))  # not square and not the target size: resize + crop act
    height, width = image_processor(images=[probe], return_tensors="pt")["pixel_values"].shape[-2:]
    if (height, width) != (image_size, image_size):
        raise ValidationError(
            f"The image processor makes {height}x{width} images but {where.lower()} takes {image_size}x{image_size} "
            f"(vision_config.image_size). Use the processor saved with the model (e.g. "
            f"`AutoProcessor.from_pretrained(checkpoint)`), or one whose crop size is {image_size}."
        )


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


def check_bn_rates(config) -> None:
    """Learning rates and loss weights of a BN-family run (`hf_pmi.resnet.ResNetContinualConfig`): a NaN or
    infinite rate would train every weight to NaN, so it is refused before any work (as the CLIP path does)."""
    for name in ("lr", "head_lr"):
        value = getattr(config, name)
        require(finite(value) and value > 0, name, value, "a finite number > 0 (NaN or inf trains every weight to "
                "NaN)", f"Pass a number such as --{'learning_rate' if name == 'lr' else name} 0.1.")
    for name, value in config.weights.items():
        require_weight(f"weights[{name!r}]", value)


def _value(setting):
    return getattr(setting, "value", setting)  # an enum of transformers (IntervalStrategy, ...) or its string


def check_task_loop_arguments(args) -> None:
    """`TrainingArguments` the continual task loop does not support are refused with the reason (never
    ignored, and never a pickled Trainer checkpoint written): see each message."""
    if _value(args.eval_strategy) != "no" or getattr(args, "eval_on_start", False):
        raise ValidationError(
            f"eval_strategy={_value(args.eval_strategy)!r} (or eval_on_start) is not supported: the continual loop "
            f"evaluates after every task, on the test data of all seen classes (a row of the accuracy matrix, logged "
            f"as eval/...), and has no evaluation set within a task. Drop --eval_strategy / --eval_on_start."
        )
    if _value(args.save_strategy) != "no":
        raise ValidationError(
            f"save_strategy={_value(args.save_strategy)!r} is not supported: every finished task is saved as "
            f"output_dir/task-<i> (safetensors and JSON, what --resume_from_checkpoint reads), while the Trainer's "
            f"mid-task checkpoints would hold pickled optimizer and RNG states that resume never uses, numbered "
            f"afresh in every task. Drop --save_strategy."
        )
    if args.load_best_model_at_end:
        raise ValidationError(
            "load_best_model_at_end=True is not supported: there is no evaluation within a task to choose a best "
            "model by, and every task continues from the previous task's last weights. Drop --load_best_model_at_end."
        )
    require(args.max_steps != 0, "max_steps", args.max_steps, "> 0 (steps per task) or -1 (train for "
            "num_train_epochs instead)", "0 would not train at all: drop --max_steps to train by epochs.")
    if not args.do_train:
        raise ValidationError(
            "do_train=False is not supported: a continual run always learns its tasks. To evaluate a model "
            "without training it use --method zero_shot, and to score a checkpoint `hf-pmi eval --checkpoint ...`."
        )


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
    present = np.array(sorted(_streamed_labels(train, label_column, len(names)))) if labels is None else np.unique(labels)
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


def _streamed_labels(train, label_column: str, num_classes: int) -> set[int]:
    """The labels of a streamed dataset: its label column is read (no image is decoded) until every one of
    `num_classes` classes has been seen; a class with no row costs one pass over the labels."""
    seen: set[int] = set()
    for row in train.select_columns([label_column]):
        seen.add(int(row[label_column]))
        if len(seen) >= num_classes:
            break
    return seen


def _image_problem(value) -> str | None:
    """What is wrong with an undecoded image (``{"bytes", "path"}`` or None), or None if PIL can read it."""
    import io

    from PIL import Image

    if value is None or (isinstance(value, dict) and not value.get("bytes") and not value.get("path")):
        return "the image is missing (None)"
    data, path = value.get("bytes"), value.get("path")
    if not data and not os.path.isfile(path):
        return f"the image file {path} does not exist"
    try:
        with Image.open(io.BytesIO(data) if data else path) as image:
            image.verify()  # reads the whole file: a truncated PNG fails here, not in the middle of a task
    except Exception as e:
        name = path or "(stored in the dataset)"
        return f"the image {name} cannot be read ({type(e).__name__}: {e}): it is truncated or not an image"
    return None


def check_images(ds, image_column: str, split: str) -> None:
    """Every image of a map-style dataset exists and PIL can read it (one pass over the encoded images, none
    decoded); the first broken one is named by its row and file. Streamed data is only read while training."""
    from datasets import Image as ImageFeature

    if not hasattr(ds, "__len__") or not isinstance((ds.features or {}).get(image_column), ImageFeature):
        return
    raw = ds.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
    chunk = 1000  # rows per read: bounded memory whatever the dataset's size
    for start in range(0, len(raw), chunk):
        for row, value in enumerate(raw[start : start + chunk][image_column], start):
            problem = _image_problem(value)
            if problem:
                raise ValidationError(
                    f"Row {row} of the {split} data: {problem}. Fix or drop the broken rows before training, e.g. "
                    f"`ds = ds.select([i for i in range(len(ds)) if i != {row}])`."
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


def check_named_splits(data, train_split: str, test_split: str | None) -> None:
    """The splits a run names must exist. A missing test split is allowed only where the data has no split but
    the training one (then a share of it is held out): otherwise a misspelt name would silently evaluate on
    held-out training images instead of the data's own test split.

    Example:
        >>> check_named_splits({"train": 0, "test": 0}, "train", "tset")
        Traceback (most recent call last):
        ...
        hf_pmi.validation.ValidationError: No 'tset' split in the data, which has the splits ['train', 'test']. ...
    """
    if not hasattr(data, "keys"):
        return  # a single split: the caller holds out its own test data
    splits = list(data.keys())
    if train_split not in splits:
        raise ValidationError(
            f"No {train_split!r} split in the data, which has the splits {splits}. Name the training split with "
            f"--train_split (train_split=), e.g. --train_split {splits[0]}."
        )
    others = [s for s in splits if s != train_split]
    if test_split and test_split not in splits and others:
        close = difflib.get_close_matches(test_split, others, n=1)
        raise ValidationError(
            f"No {test_split!r} split in the data, which has the splits {splits}. Name its test split with "
            f"--test_split (test_split=), e.g. --test_split {(close or others)[0]}; a share of the training split is "
            f"held out (--test_size) only for data that has no split but {train_split!r}."
        )


#: Image-processor settings a model is trained under: a continuation must prepare images the same way.
PROCESSOR_SETTINGS = ("size", "crop_size", "image_mean", "image_std", "rescale_factor", "do_normalize", "do_center_crop")


def check_same_processor(folder: str, processing_class, where: str) -> None:
    """A processor passed to continue a checkpoint must prepare images as the checkpoint's own did (its
    ``preprocessor_config.json``, or the image processor in ``processor_config.json``): another size or
    normalisation silently costs the old classes' accuracy."""
    import json as _json

    from .integrity import read_json

    if processing_class is None:
        return
    if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):  # an image processor saved on its own
        saved = read_json(os.path.join(folder, "preprocessor_config.json"))
    elif os.path.isfile(os.path.join(folder, "processor_config.json")):  # a processor (transformers v5: one file)
        saved = read_json(os.path.join(folder, "processor_config.json")).get("image_processor") or {}
    else:
        return
    given = getattr(processing_class, "image_processor", processing_class)
    given = given.to_dict() if hasattr(given, "to_dict") else {}
    given = _json.loads(_json.dumps({k: given[k] for k in PROCESSOR_SETTINGS if k in given}, default=str))
    differ = {key: (saved[key], given[key]) for key in PROCESSOR_SETTINGS if key in saved and key in given
              and saved[key] != given[key]}
    if differ:
        details = "; ".join(f"{k}: checkpoint {a}, given {b}" for k, (a, b) in differ.items())
        raise ValidationError(
            f"The processor passed to continue {where} prepares images differently from the checkpoint's own ({details}). "
            f"Its model learned on images prepared the checkpoint's way, so old classes would lose accuracy silently. "
            f"Leave processing_class out (the checkpoint's processor is used), or pass one with the same settings."
        )


def warn_unscored_classes(test, label_column: str, names: list[str]) -> list[str]:
    """Warn (`UserWarning`) about training classes without a single test example: they are never scored, so
    every accuracy covers the other classes only. Returns their names (none for streamed test data)."""
    import warnings

    labels = _label_array(test, label_column)
    if labels is None:
        return []
    present = {int(y) for y in np.unique(labels)}
    missing = [name for i, name in enumerate(names) if i not in present]
    if missing:
        warnings.warn(
            f"{len(missing)} class(es) have no test examples and are never scored: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}. Every accuracy (A_last, the accuracy matrix) covers the other "
            f"classes only. Add test images for them, or drop them from the training data.",
            UserWarning, stacklevel=3,
        )
    return missing


def refuse_known_classes(known, tasks, source: str) -> None:
    """A continued run learns new classes only: names the checkpoint already has are refused."""
    clash = sorted(set(known) & set(tasks.class_names))
    if clash:
        raise ValueError(f"Class name(s) {clash} already exist in {source}: a continued run learns new classes only. "
                         f"Drop them from the new data or rename them.")
