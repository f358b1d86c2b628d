"""Class-incremental task splits from `datasets`, and the collator that turns rows into batches.

Classes are renumbered in the order they are learnt: the first class of task 0 becomes class 0,
and so on, so a model's logit ``k`` always means ``tasks.class_names[k]``. Datasets keep their
original labels (nothing is rewritten or decoded to split them); the collator maps labels on the
fly.

Example:
    >>> from hf_pmi import split_class_incremental
    >>> from hf_pmi.testing import load_digits_dataset
    >>> tasks = split_class_incremental(load_digits_dataset(), num_tasks=5, seed=1993)
    >>> len(tasks), tasks[0].class_names
    (5, ['four', 'two'])
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    IterableDataset,
    IterableDatasetDict,
    concatenate_datasets,
)

from .images import to_rgb
from .validation import (
    align_test_labels,
    check_class_names,
    check_images,
    check_labels_match_names,
    check_named_splits,
    check_test_split,
    warn_unscored_classes,
)

AnyDataset = Dataset | IterableDataset


@dataclass
class ContinualTask:
    """One task: its classes (ids in learning order, names) and its train / test data."""

    task_id: int
    class_ids: list[int]
    class_names: list[str]
    train: AnyDataset | None = None
    test: AnyDataset | None = None


@dataclass
class ContinualTasks:
    """The tasks of a class-incremental run, with the class order they were cut from.

    ``class_order[k]`` is the dataset's original label of the k-th learnt class and
    ``class_names[k]`` its name. Index it like a list of `ContinualTask`.
    """

    tasks: list[ContinualTask]
    class_order: list[int]
    class_names: list[str]
    image_column: str = "image"
    label_column: str = "label"
    label_offset: int = 0  # > 0 when continuing a model that already knows `label_offset` classes
    task_offset: int = 0  # > 0 when continuing a run that already finished `task_offset` tasks
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> ContinualTask:
        return self.tasks[i]

    def __iter__(self):
        return iter(self.tasks)

    @property
    def label_map(self) -> dict[int, int]:
        """Original dataset label -> class id in learning order."""
        return {orig: self.label_offset + k for k, orig in enumerate(self.class_order)}

    def seen_test(self, upto: int) -> AnyDataset | None:
        """Test data of tasks ``0 .. upto`` (those that have test data), concatenated."""
        parts = [t.test for t in self.tasks[: upto + 1] if t.test is not None]
        return concatenate_datasets(parts) if parts else None

    def seen_train(self, upto: int) -> AnyDataset:
        """Training data of tasks ``0 .. upto`` concatenated (the `joint` upper bound uses it)."""
        return concatenate_datasets([t.train for t in self.tasks[: upto + 1]])

    def continuing(self, num_classes: int, num_tasks: int) -> "ContinualTasks":
        """These tasks renumbered to follow a model that knows `num_classes` classes from `num_tasks` tasks."""
        tasks = [
            dataclasses.replace(t, class_ids=[num_classes + c - self.label_offset for c in t.class_ids])
            for t in self.tasks
        ]
        return dataclasses.replace(self, tasks=tasks, label_offset=num_classes, task_offset=num_tasks)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (recorded in every checkpoint)."""
        return {
            "class_order": self.class_order,
            "class_names": self.class_names,
            "tasks": [t.class_ids for t in self.tasks],
            "label_offset": self.label_offset,
            "task_offset": self.task_offset,
            **self.metadata,
        }


@dataclass
class TaskPlan:
    """What the trainer trains on in one task: the dataset, a collator for it (None: the trainer's),
    and `TrainingArguments` values that hold for this task only (restored afterwards, also on error)."""

    train_dataset: Any
    collator: Callable | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def read_class_order(path: str) -> list[int]:
    """Label ids from a JSON list or a text file of integers separated by commas or whitespace."""
    with open(path) as f:
        text = f.read().strip()
    try:
        order = json.loads(text) if text.startswith("[") else [int(t) for t in text.replace(",", " ").split()]
    except ValueError as e:
        raise ValueError(f"{path}: a class order is a JSON list or integers separated by commas/whitespace ({e}).") from None
    return [int(c) for c in order]


def load_image_dataset(dataset_name: str | None = None, dataset_config: str | None = None, data_dir: str | None = None,
                       *, streaming: bool = False, train_split: str = "train", test_split: str = "test",
                       test_size: float = 0.2, label_column: str = "label", seed: int = 0):
    """A labelled image dataset from a Hub id or a local image folder (``<data_dir>/{train,test}/<class>/*``,
    which wins), with a test split held out of `train_split` (stratified by `label_column`, seeded) when it
    has no split but `train_split` and ``test_size > 0``. A `train_split` or `test_split` the data does not
    have, where the data has other splits, is refused naming them (a typo never tests on training images)."""
    from datasets import load_dataset

    if data_dir:
        if not os.path.isdir(os.path.expanduser(data_dir)):
            raise FileNotFoundError(f"No image folder at --data_dir {data_dir!r} (resolved to {os.path.abspath(data_dir)}, current "
                                    f"directory {os.getcwd()}). Check the path, or name a Hub dataset instead.")
        data = load_dataset("imagefolder", data_dir=data_dir, streaming=streaming)
    elif dataset_name:
        data = load_dataset(dataset_name, dataset_config, streaming=streaming)
    else:
        raise ValueError("Name the data: --dataset_name <Hub id> or --data_dir <local image folder>.")
    check_named_splits(data, train_split, test_split)  # a misspelt split is refused, never replaced by a hold-out
    if isinstance(data, DatasetDict) and test_split and test_split not in data and test_size > 0:
        split = data[train_split].train_test_split(test_size=test_size, seed=seed, stratify_by_column=label_column)
        data = DatasetDict({train_split: split["train"], test_split: split["test"]})
    return data


def _task_sizes(num_classes, num_tasks, initial_classes, classes_per_task) -> list[int]:
    if num_tasks is not None and (initial_classes is not None or classes_per_task is not None):
        raise ValueError("Give either `num_tasks`, or `initial_classes` and/or `classes_per_task`, not both.")
    if num_tasks is not None:
        if not 1 <= num_tasks <= num_classes:
            raise ValueError(
                f"num_tasks={num_tasks} but the data has {num_classes} classes: every task needs at least one "
                f"class, so choose num_tasks between 1 and {num_classes}."
            )
        base, extra = divmod(num_classes, num_tasks)
        return [base + (1 if i < extra else 0) for i in range(num_tasks)]
    step = classes_per_task if classes_per_task is not None else initial_classes  # 0 is refused, not replaced
    if step is None:
        raise ValueError("Say how to cut the classes: pass `num_tasks=` or `initial_classes=` / `classes_per_task=`.")
    first = initial_classes if initial_classes is not None else step
    if first < 1 or step < 1 or first > num_classes:
        raise ValueError(
            f"initial_classes={first} and classes_per_task={step} do not fit {num_classes} classes: both must be "
            f">= 1 and initial_classes <= {num_classes}."
        )
    sizes, left = [first], num_classes - first
    while left > 0:
        sizes.append(min(step, left))
        left -= sizes[-1]
    return sizes


def class_names_of(ds: AnyDataset, label_column: str, class_names: list[str] | None = None) -> list[str]:
    """`class_names` if given, else the names of the label column's `ClassLabel` (errors name the fix)."""
    features = ds.features
    if features is not None and label_column not in features:
        raise ValueError(
            f"The dataset has no label column {label_column!r} (columns: {sorted(features)}). "
            f"Pass `label_column=` with the name of the column that holds the class labels."
        )
    if class_names is not None:
        return list(class_names)
    feature = features[label_column] if features is not None else None
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    raise ValueError(
        f"The label column {label_column!r} has no class names (its feature is {feature!r}). CLIP classifies by "
        f"class name, so cast it to a ClassLabel, e.g. "
        f"`ds = ds.cast_column({label_column!r}, ClassLabel(names=[...]))`, or pass `class_names=[...]`."
    )


def images_from_paths(ds: AnyDataset, image_column: str) -> AnyDataset:
    """`ds` with an image column of file paths (strings) read as images (`datasets.Image`, decoded when read)."""
    from datasets import Image, Value

    feature = (ds.features or {}).get(image_column)
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return ds.cast_column(image_column, Image())
    return ds


def select_classes(ds: AnyDataset, label_column: str, labels: list[int]) -> AnyDataset:
    """Rows whose label is in `labels`, reading the label column only (images are never decoded)."""
    if isinstance(ds, IterableDataset):
        wanted = set(labels)
        return ds.filter(lambda y: y in wanted, input_columns=label_column)
    column = np.asarray(ds.select_columns([label_column]).with_format("numpy")[label_column])
    return ds.select(np.flatnonzero(np.isin(column, labels)))


def split_class_incremental(
    data: Dataset | DatasetDict | IterableDataset | IterableDatasetDict,
    num_tasks: int | None = None,
    *,
    initial_classes: int | None = None,
    classes_per_task: int | None = None,
    class_order: list[int] | None = None,
    seed: int | None = 1993,
    class_names: list[str] | None = None,
    label_column: str = "label",
    image_column: str = "image",
    train_split: str = "train",
    test_split: str | None = "test",
    verify_images: bool = True,
) -> ContinualTasks:
    """Cut a labelled image dataset into class-incremental tasks.

    Args:
        data: a `Dataset` / `IterableDataset` (training data only) or a `DatasetDict` /
            `IterableDatasetDict` with `train_split` and, optionally, `test_split`.
        num_tasks: number of equal tasks (the remainder of classes goes to the first tasks).
        initial_classes, classes_per_task: the alternative cut: a first task of `initial_classes`
            classes, then tasks of `classes_per_task` classes.
        class_order: original label ids in learning order; default: a permutation of all classes
            drawn with `seed` (NumPy's `RandomState(seed).permutation`, as in LAMDA-PILOT); with
            `seed=None` the natural order.
        class_names: names of the original labels, when the label column is not a `ClassLabel`.
        test_split: the test split of a dict (it must exist); None trains without evaluation. Its
            labels are matched to the training labels by class name, whatever their ids.
        verify_images: read every image of map-style data once (encoded, not decoded) and check that PIL
            can open it, so that a missing, empty or truncated image fails now, named by its row and file,
            not in the middle of a task. False skips that pass (very large datasets you trust).

    An image column of file paths (strings) is read as images. A streamed dataset's label column is read
    until every class has been seen, so an empty class fails now too.

    Raises `ValueError` naming the fix for a missing label column, labels without names, empty class
    names, more tasks than classes, a bad class order, a class or task without training examples, or a
    missing or unreadable image.
    """
    if isinstance(data, (DatasetDict, IterableDatasetDict)):
        if train_split not in data:
            raise ValueError(f"No {train_split!r} split in {list(data)}; pass `train_split=` to name it.")
        check_test_split(data, test_split)
        train, test = data[train_split], (data[test_split] if test_split else None)
    else:
        train, test = data, None
    names = class_names_of(train, label_column, class_names)
    check_class_names(names)
    check_labels_match_names(train, label_column, names, class_names is not None)
    if test is not None:
        test = align_test_labels(test, train, label_column, names)  # by class name, not by id
        warn_unscored_classes(test, label_column, names)  # a class without test data is never scored: say so
    if image_column not in (train.features or {image_column: None}):
        raise ValueError(
            f"The dataset has no image column {image_column!r} (columns: {sorted(train.features)}); "
            f"pass `image_column=`."
        )
    train = images_from_paths(train, image_column)
    test = images_from_paths(test, image_column) if test is not None else None
    if verify_images:
        check_images(train, image_column, "training")
        if test is not None:
            check_images(test, image_column, "test")
    num_classes = len(names)
    if class_order is None:
        order = np.arange(num_classes) if seed is None else np.random.RandomState(seed).permutation(num_classes)
        class_order = [int(c) for c in order]
    elif sorted(class_order) != list(range(num_classes)):
        raise ValueError(
            f"class_order must list every label 0..{num_classes - 1} exactly once; got {class_order}."
        )
    sizes = _task_sizes(num_classes, num_tasks, initial_classes, classes_per_task)

    tasks, start = [], 0
    for t, size in enumerate(sizes):
        labels = class_order[start : start + size]
        task = ContinualTask(
            task_id=t,
            class_ids=list(range(start, start + size)),
            class_names=[names[c] for c in labels],
            train=select_classes(train, label_column, labels),
            test=select_classes(test, label_column, labels) if test is not None else None,
        )
        if isinstance(task.train, Dataset) and len(task.train) == 0:
            raise ValueError(
                f"Task {t} (classes {task.class_names}) has no training examples. Check that the label column "
                f"{label_column!r} uses ids 0..{num_classes - 1} matching the class names, or choose a class "
                f"order / number of tasks without empty classes."
            )
        tasks.append(task)
        start += size
    return ContinualTasks(
        tasks=tasks,
        class_order=class_order,
        class_names=[names[c] for c in class_order],
        image_column=image_column,
        label_column=label_column,
        metadata={"seed": seed, "num_classes": num_classes, "dataset": getattr(train.info, "dataset_name", None)},
    )


class ContinualCollator:
    """Rows of images and original labels -> ``{"pixel_values", "labels"}`` in learning order.

    Works for map-style and streaming datasets alike: images are decoded and processed here, per
    batch, by the CLIP image processor.
    """

    def __init__(self, image_processor, label_map: dict[int, int], image_column="image", label_column="label"):
        self.image_processor = image_processor
        self.label_map = dict(label_map)
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        missing = [row[self.label_column] for row in rows if row[self.image_column] is None]
        if missing:
            raise ValueError(
                f"An image is missing (None) in a row of label {missing[0]} of these tasks' data. Drop the rows "
                f"without an image, e.g. `ds.filter(lambda image: image is not None, input_columns={self.image_column!r})`."
            )
        images = [to_rgb(row[self.image_column]) for row in rows]  # float / 16-bit images keep their contrast
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        try:
            labels = [self.label_map[int(row[self.label_column])] for row in rows]
        except KeyError as err:
            raise ValueError(
                f"Label {err.args[0]} is not among the classes of these tasks ({sorted(self.label_map)})."
            ) from None
        return {"pixel_values": pixel_values, "labels": torch.tensor(labels, dtype=torch.long)}
