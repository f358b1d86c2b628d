"""`tensor_tasks`: the tasks of `split_class_incremental` as the CPU tensors `learn_tasks` trains on.

Every image of each task's train and test split is decoded once (`hf_pmi.images.to_rgb`: float and
16-bit images keep their contrast), resized bilinearly to ``image_size x image_size`` when it has
another size (non-square images are stretched), scaled to [0, 1] and normalised per channel. Labels
become the learnt class ids (``tasks.label_map``: contiguous 0.. in learning order). Memory: 4 bytes
per value, e.g. 0.6 GB for CIFAR-100's 60 000 images at 32 px, 4.9 GB for Tiny-ImageNet at 64 px.

Example:
    >>> from datasets import ClassLabel, Dataset, DatasetDict, Features, Image as ImageFeature
    >>> from PIL import Image
    >>> from hf_pmi.data import split_class_incremental
    >>> def split(n):  # class c: constant images of grey level 60 * c, 6x6 px
    ...     rows = {"image": [Image.new("RGB", (6, 6), (60 * c,) * 3) for c in range(3) for _ in range(n)],
    ...             "label": [c for c in range(3) for _ in range(n)]}
    ...     features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c"])})
    ...     return Dataset.from_dict(rows, features=features)
    >>> tasks = split_class_incremental(DatasetDict(train=split(4), test=split(2)), num_tasks=2, seed=None)
    >>> tt = tensor_tasks(tasks, image_size=4, mean=(0.5,) * 3, std=(0.25,) * 3, progress=False)
    >>> [t.class_ids for t in tt], tuple(tt[0].x.shape), tt[1].y_test.tolist()
    ([[0, 1], [2]], (8, 3, 4, 4), [2, 2])
    >>> round(tt[1].x[0, 0, 0, 0].item(), 3)  # (120 / 255 - 0.5) / 0.25
    -0.118
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..data import ContinualTasks
from ..images import to_rgb
from .continual import TensorTask

_CHUNK = 1000  # rows decoded per read: bounded memory whatever the split's size
_UNDECODABLE = (OSError, ValueError, SyntaxError)  # what PIL raises for a missing, truncated or corrupt file


def _open(value) -> Image.Image:
    """An image from an encoded `datasets.Image` value ({"bytes", "path"}) or anything `to_rgb` reads."""
    if isinstance(value, dict):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
        if source is None:
            raise ValueError("the image has neither bytes nor a path")
        value = Image.open(source)
        value.load()  # decode now, so a truncated file fails here, named by its row
    if value is None:
        raise ValueError("the image is missing (None)")
    return to_rgb(value)


def _split_tensors(ds, image_column, label_column, label_map, size, mean, std, where, progress):
    from datasets import Image as ImageFeature
    from tqdm.auto import tqdm

    if isinstance((ds.features or {}).get(image_column), ImageFeature):
        ds = ds.cast_column(image_column, ImageFeature(decode=False))  # decoded here, so errors name the row
    pixels, labels, row = [], [], 0
    total = len(ds) if hasattr(ds, "__len__") else None
    with tqdm(total=total, desc=f"decoding {where}", unit="img", disable=not progress) as bar:
        for batch in ds.select_columns([image_column, label_column]).iter(batch_size=_CHUNK):
            for value, label in zip(batch[image_column], batch[label_column]):
                try:
                    image = _open(value)
                except _UNDECODABLE as e:
                    raise ValueError(f"Row {row} of {where}: the image cannot be decoded ({type(e).__name__}: {e}). "
                                     f"Fix or drop that row, e.g. `ds.select([i for i in range(len(ds)) if i != {row}])`.") from e
                if image.size != (size, size):
                    image = image.resize((size, size), Image.BILINEAR)
                pixels.append(np.asarray(image, dtype=np.uint8))
                labels.append(label_map[int(label)])
                row += 1
            bar.update(len(batch[label_column]))
    if not pixels:
        raise ValueError(f"{where[0].upper()}{where[1:]} holds no rows: every task needs training and test images. "
                         "Check the split's labels, or choose a class order / number of tasks without empty classes.")
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W) in [0, 1]
    x = x.sub_(torch.tensor(mean).view(1, 3, 1, 1)).div_(torch.tensor(std).view(1, 3, 1, 1))
    return x.contiguous(), torch.tensor(labels, dtype=torch.long)


def tensor_tasks(tasks: ContinualTasks, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 progress: bool = True) -> list[TensorTask]:
    """One `TensorTask` per task of `tasks`: normalised float pixels ``(N, 3, image_size, image_size)``
    and learnt class ids, train and test, on the CPU (see the module docstring).

    Raises `ValueError` naming the fix for a task without test data, an image that cannot be decoded
    (named by its row), or `mean` / `std` that are not three values with positive stds.
    """
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need one value per RGB channel (3 each, std > 0); got {mean} and {std}.")
    label_map = tasks.label_map
    out = []
    for task in tasks:
        if task.test is None or task.train is None:
            raise ValueError(f"Task {task.task_id} ({task.class_names[:3]}...) has no {'test' if task.train else 'training'} "
                             "data: the accuracy matrix needs both. Cut the tasks from a DatasetDict with a test split "
                             "(test_split=, --test_split) or hold one out of the training split (--test_size).")
        x, y = _split_tensors(task.train, tasks.image_column, tasks.label_column, label_map, image_size, mean, std,
                              f"task {task.task_id}'s training data", progress)
        x_test, y_test = _split_tensors(task.test, tasks.image_column, tasks.label_column, label_map, image_size,
                                        mean, std, f"task {task.task_id}'s test data", progress)
        out.append(TensorTask(list(task.class_ids), x, y, x_test, y_test, list(task.class_names)))
    return out
