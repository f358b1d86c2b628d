import pytest
from datasets import ClassLabel, Dataset, IterableDataset

from hf_pmi import split_class_incremental
from hf_pmi.data import ContinualCollator


def test_split_by_num_tasks_covers_every_class_once(digits):
    tasks = split_class_incremental(digits, num_tasks=5, seed=1993)
    assert len(tasks) == 5
    assert sorted(tasks.class_order) == list(range(10))
    assert [t.class_ids for t in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    names = digits["train"].features["label"].names
    assert tasks.class_names == [names[c] for c in tasks.class_order]
    total = 0
    for task in tasks:
        labels = set(task.train["label"]) | set(task.test["label"])
        assert labels == {tasks.class_order[c] for c in task.class_ids}
        total += len(task.train)
    assert total == len(digits["train"])


def test_class_order_is_seeded_and_explicit_order_is_kept(digits):
    a = split_class_incremental(digits, num_tasks=2, seed=1)
    b = split_class_incremental(digits, num_tasks=2, seed=1)
    c = split_class_incremental(digits, num_tasks=2, seed=2)
    assert a.class_order == b.class_order != c.class_order
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    d = split_class_incremental(digits, num_tasks=2, class_order=order)
    assert d.class_order == order and d[0].class_names == ["nine", "eight", "seven", "six", "five"]


def test_initial_classes_then_increments(digits):
    tasks = split_class_incremental(digits, initial_classes=4, classes_per_task=3)
    assert [len(t.class_ids) for t in tasks] == [4, 3, 3]


def test_streaming_split_filters_lazily(digits):
    stream = digits["train"].to_iterable_dataset()
    tasks = split_class_incremental(stream, num_tasks=5, seed=0)
    assert isinstance(tasks[0].train, IterableDataset)
    wanted = {tasks.class_order[c] for c in tasks[1].class_ids}
    rows = list(tasks[1].train)
    assert rows and {r["label"] for r in rows} == wanted


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_tasks=11), "num_tasks=11"),
        (dict(num_tasks=2, label_column="digit"), "no label column 'digit'"),
        (dict(num_tasks=2, class_order=[0, 1]), "class_order must list"),
        (dict(), "pass `num_tasks=`"),
    ],
)
def test_bad_arguments_name_the_problem(digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_class_incremental(digits, **kwargs)


def test_labels_without_names_are_refused(digits):
    plain = digits["train"].cast_column("label", digits["train"].features["label"].__class__(num_classes=10))
    plain = Dataset.from_dict({"image": digits["train"]["image"][:20], "label": list(range(10)) * 2})
    with pytest.raises(ValueError, match="no class names"):
        split_class_incremental(plain, num_tasks=2)
    named = plain.cast_column("label", ClassLabel(names=list("abcdefghij")))
    assert split_class_incremental(named, num_tasks=2)[0].class_names


def test_empty_task_is_refused(digits):
    some = digits["train"].filter(lambda y: y < 8, input_columns="label")
    with pytest.raises(ValueError, match="no training examples"):
        split_class_incremental(some, num_tasks=10, seed=None)


def test_collator_maps_labels_to_learning_order(digits, processor):
    tasks = split_class_incremental(digits, num_tasks=5, seed=3)
    collate = ContinualCollator(processor.image_processor, tasks.label_map)
    rows = [tasks[2].train[i] for i in range(4)]
    batch = collate(rows)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert all(tasks.class_order[int(y)] == r["label"] for y, r in zip(batch["labels"], rows))
    assert set(batch["labels"].tolist()) <= set(tasks[2].class_ids)


def test_letters_backbone_is_pretrained_cached_and_detached_from_its_cache(processor):
    """letters_clip trains once (above chance on held-out letters), reloads bit-exactly from its cache
    without training again, and carries no cache path that checkpoints could point to (the session's
    $HF_PMI_CACHE; ~25 s to train)."""
    import os
    from pathlib import Path

    import torch

    from hf_pmi import ContinualCLIP
    from hf_pmi.testing import letters_clip, load_letters_dataset

    from hf_pmi.testing.cache import cache_folder

    clip = letters_clip("tiny")
    folder = Path(cache_folder("letters-clip-tiny", size="tiny", seed=0, epochs=12.0, per_class=100, image_size=32))
    assert folder.parent == Path(os.environ["HF_PMI_CACHE"])
    stamp = os.path.getmtime(folder / "model.safetensors")
    again = letters_clip("tiny")
    assert os.path.getmtime(folder / "model.safetensors") == stamp  # loaded, not trained again
    for (name, a), (_, b) in zip(clip.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert clip.config._name_or_path == ""

    test = load_letters_dataset(train_per_class=1, test_per_class=10)["test"]
    names = test.features["label"].names
    model = ContinualCLIP.from_clip(clip, class_names=names, tokenizer=processor.tokenizer, templates=["{}"])
    pixels = processor.image_processor([im for im in test["image"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        predicted = model(pixel_values=pixels).logits.argmax(-1)
    accuracy = (predicted == torch.tensor(test["label"])).float().mean().item()
    assert accuracy > 3 / 26, accuracy  # chance is 1/26; measured 0.21
