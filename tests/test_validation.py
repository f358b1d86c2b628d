"""Bad inputs are refused before any training step, with an error that names the cause and the fix.

Every refusal test goes through `refused`: it builds the data, the model and the trainer and calls
`train()` as a user would, asserts the error, and asserts that no task folder was written.
"""

import functools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from PIL import Image

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, FeatureBank, split_class_incremental
from hf_pmi.arguments import flag_dataclasses, from_flags
from hf_pmi.data import ContinualCollator
from hf_pmi.integrity import file_checksums, write_json
from hf_pmi.methods import METHODS
from hf_pmi.testing import build_clip, load_digits_dataset
from transformers import HfArgumentParser

@functools.cache
def _digits():
    return load_digits_dataset()


TINY_FLAGS = dict(inversion_layer_steps=2, inversion_first_block_steps=4, inversion_upsample_at=[1, 2, 3],
                  inversion_refine_steps=2, sampling_per_class=2, exemplar_per_class=2)


def method_config(method: str, flags: dict | None = None):
    """The config of `method` from command-line flags, as a recipe builds it (unknown flags are dropped)."""
    config_cls = METHODS[method].config_class
    classes = flag_dataclasses(config_cls)
    known = {f for c in classes for f in c.__dataclass_fields__}
    values = {k: v for k, v in {**TINY_FLAGS, **(flags or {})}.items() if k in known}
    return from_flags(config_cls, HfArgumentParser(classes).parse_dict(values))


def task_folders(out) -> list[str]:
    return sorted(p for p in os.listdir(out) if p.startswith("task-")) if os.path.isdir(out) else []


def make_args(out, **kw):
    defaults = dict(output_dir=str(out), method="finetune", max_steps=1, per_device_train_batch_size=16, warmup_steps=0,
                    disable_tqdm=True, logging_steps=100, seed=0, report_to="none")
    defaults.update(kw)
    return ContinualConfig(**defaults)


def run(out, processor, data=None, split=None, args=None, flags=None, templates=None, resume=None, **kw):
    """Build everything from user inputs (method settings as `flags`) and train; returns the result."""
    tasks = split_class_incremental(data if data is not None else _digits(), **(split or {"num_tasks": 2}))
    model = ContinualCLIP.from_clip(build_clip("tiny"), templates=templates)
    args = make_args(out, **(args or {}))
    trainer = ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=processor,
                               method_config=method_config(args.method, flags), **kw)
    return trainer.train(resume_from_checkpoint=resume)


def refused(tmp_path, match, build, error=ValueError, out=None):
    out = out or tmp_path / "out"
    before = task_folders(out)
    with pytest.raises(error, match=match):
        build(out)
    assert task_folders(out) == before, "a task folder was written before the error"


# ----- data ------------------------------------------------------------------------------------
def test_class_names_shorter_than_the_classlabel(tmp_path, digits, processor):
    names = digits["train"].features["label"].names[:9]
    refused(tmp_path, r"class_names has 9 names .* ClassLabel of 10 classes",
            lambda out: run(out, processor, digits, {"num_tasks": 2, "class_names": names}))


def test_class_names_longer_than_the_classlabel(tmp_path, digits, processor):
    names = digits["train"].features["label"].names + ["ten"]
    refused(tmp_path, r"class_names has 11 names .* one name per label",
            lambda out: run(out, processor, digits, {"num_tasks": 2, "class_names": names}))


def _plain(digits, n=60):
    rows = digits["train"].select(range(n))
    return Dataset.from_dict({"image": rows["image"], "label": rows["label"]})


def test_class_names_shorter_than_plain_labels(tmp_path, digits, processor):
    refused(tmp_path, r"Label\(s\) \[8, 9\] of the training data have no class name",
            lambda out: run(out, processor, _plain(digits), {"num_tasks": 2, "class_names": list("abcdefgh")}))


def test_class_names_longer_than_plain_labels_make_phantom_classes(tmp_path, digits, processor):
    refused(tmp_path, r"Class\(es\) \['k', 'l'\] have no training examples",
            lambda out: run(out, processor, _plain(digits), {"num_tasks": 2, "class_names": list("abcdefghijkl")}))


def test_class_in_test_but_not_in_train(tmp_path, digits, processor):
    names = digits["train"].features["label"].names
    test = digits["test"].cast_column("label", ClassLabel(names=names[:9] + ["ten"]))
    data = DatasetDict(train=digits["train"], test=test)
    refused(tmp_path, r"Test class\(es\) \['ten'\] do not occur in the training data.*filter",
            lambda out: run(out, processor, data))


def test_test_labels_without_a_training_class(tmp_path, digits, processor):
    train = _plain(digits)
    test = Dataset.from_dict({"image": train["image"][:4], "label": [0, 1, 2, 12]})
    data = DatasetDict(train=train, test=test)
    refused(tmp_path, r"Test label\(s\) \[12\] are not training classes",
            lambda out: run(out, processor, data, {"num_tasks": 2, "class_names": list("abcdefghij")}))


def test_misspelt_test_split(tmp_path, digits, processor):
    refused(tmp_path, r"No 'tset' split in \['train', 'test'\].*test_split=None",
            lambda out: run(out, processor, digits, {"num_tasks": 2, "test_split": "tset"}))


def test_empty_class_folder(tmp_path, digits, processor):
    images = tmp_path / "images"
    for split in ("train", "test"):
        for name in ("cat", "dog", "eel"):
            folder = images / split / name
            folder.mkdir(parents=True)
            if not (split == "train" and name == "dog"):
                for i in range(3):
                    digits["train"][i]["image"].save(folder / f"{i}.png")
    data = load_dataset("imagefolder", data_dir=str(images))
    refused(tmp_path, r"Class\(es\) \['dog'\] have no training examples \(an empty class folder",
            lambda out: run(out, processor, data, {"num_tasks": 3}))


def test_test_split_in_another_label_order_is_matched_by_name(digits):
    names = digits["train"].features["label"].names
    reordered = names[::-1]
    test = digits["test"]
    flipped = Dataset.from_dict(
        {"image": test["image"][:50], "label": [9 - y for y in test["label"][:50]]},
        features=test.select(range(50)).features.copy(),
    ).cast_column("label", ClassLabel(names=reordered))
    tasks = split_class_incremental(DatasetDict(train=digits["train"], test=flipped), num_tasks=2, seed=0)
    for task in tasks:
        got = sorted(task.test["label"])
        expected = sorted(y for y in test["label"][:50] if names[y] in task.class_names)
        assert got == expected  # test rows land in the task of their class name, with training ids


# ----- prompts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("template, match", [
    ("a photo", r"has no '\{\}'"),
    ("{} and {}", r"has no '\{\}' \(or more than one\)"),
    ("a {} of {kind}", r"cannot be formatted"),
])
def test_bad_prompt_templates(tmp_path, processor, template, match):
    refused(tmp_path, match, lambda out: run(out, processor, templates=[template]))


# ----- training settings -------------------------------------------------------------------------
@pytest.mark.parametrize("setting, match", [
    ({"learning_rate": 0.0}, r"learning_rate=0.0 is invalid: it must be > 0"),
    ({"learning_rate": -1e-3}, r"learning_rate=-0.001 is invalid"),
    ({"max_steps": -1, "num_train_epochs": 0}, r"num_train_epochs=0.* Or set max_steps"),
    ({"per_device_eval_batch_size": 0}, r"per_device_eval_batch_size=0"),
])
def test_bad_training_settings(tmp_path, processor, setting, match):
    refused(tmp_path, match, lambda out: run(out, processor, args=setting))


@pytest.mark.parametrize("method, flags, match", [
    ("pmi", {"replay_l_hkd": -0.1}, r"replay_l_hkd=-0.1 is invalid: it must be >= 0"),
    ("pmi", {"replay_grid_samples": -1}, r"replay_grid_samples=-1"),
    ("lwf", {"lwf_temperature": 0.0}, r"lwf_temperature=0.0 is invalid"),
    ("pmi", {"replay_batch_size": 0}, r"replay_batch_size=0 is invalid: it must be an integer >= 1"),
    ("feature_replay", {"replay_batch_size": 0}, r"replay_batch_size=0 is invalid: it must be an integer >= 1"),
    ("exemplar_replay", {"replay_batch_size": 0}, r"replay_batch_size=0 is invalid: it must be an integer >= 1"),
    ("exemplar_replay", {"exemplar_per_class": 0}, r"exemplar_per_class=0 is invalid"),
    ("pmi", {"inversion_layer_steps": 0}, r"inversion_layer_steps=0 is invalid: it must be an integer >= 1"),
    ("pmi", {"inversion_first_block_steps": -5}, r"inversion_first_block_steps=-5"),
    ("pmi", {"sampling_per_class": 0}, r"sampling_per_class=0"),
    ("pmi", {"inversion_refine_steps": -1}, r"inversion_refine_steps=-1 is invalid: it must be an integer >= 0"),
    ("pmi", {"inversion_layer_lr": 0.0}, r"inversion_layer_lr=0.0"),
    ("pmi", {"cfs_rho": 0.0}, r"cfs_rho=0.0 is invalid: it must be in \(0, 1\]"),
    ("pmi", {"cfs_tau": 0.0}, r"cfs_tau=0.0"),
    ("pmi", {"cfs_boost": 0}, r"cfs_boost=0"),
    ("pmi", {"inversion_alpha_tv": -1.0}, r"inversion_alpha_tv=-1.0"),
    ("pmi", {"inversion_upsample_at": [1, 2, 40]}, r"inversion_upsample_at=\[1, 2, 40\].*first_block_steps=4"),
    ("full_inversion", {"inversion_full_steps": 0}, r"inversion_full_steps=0"),
    ("pmi", {"inversion_start_block": 0}, r"inversion_start_block=0 is the block replay enters.*between 1"),  # replay enters after the patch embedding
])
def test_bad_method_settings_fail_before_task_0(tmp_path, processor, method, flags, match):
    refused(tmp_path, match, lambda out: run(out, processor, args={"method": method}, flags=flags))


# ----- output folder -----------------------------------------------------------------------------
def test_output_dir_that_cannot_be_written(tmp_path, processor):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    refused(tmp_path, r"Cannot write to output_dir .*Choose a writable folder",
            lambda out: run(out, processor), out=blocker / "out")


def test_output_dir_with_finished_tasks_needs_resume_or_overwrite(tmp_path, processor):
    out = tmp_path / "out"
    (out / "task-0").mkdir(parents=True)
    (out / "task-0" / "continual_state.json").write_text("{}")
    refused(tmp_path, r"already holds finished tasks \(task-0\).*resume_from_checkpoint.*overwrite_output_dir",
            lambda out: run(out, processor))
    assert (out / "task-0" / "continual_state.json").read_text() == "{}"  # untouched
    (out / "task-7").mkdir()  # a stale task of a longer earlier run
    (out / "task-7" / "continual_state.json").write_text("{}")
    result = run(out, processor, args={"overwrite_output_dir": True})  # asked for: the old tasks are replaced
    assert task_folders(out) == ["task-0", "task-1"] and len(result.accuracy_matrix) == 2
    assert json.loads((out / "task-0" / "continual_state.json").read_text())["task_id"] == 0


# ----- checkpoints -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-task finetune run of one step per task (the checkpoint the resume tests start from)."""
    from hf_pmi.testing import build_processor

    out = tmp_path_factory.mktemp("finished") / "run"
    run(out, build_processor())
    return out


def copy_run(finished_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "task-1")  # task 0 finished, task 1 to do
    return out


@pytest.mark.parametrize("change, match", [
    (dict(args={"method": "lwf"}), r"trained with method 'finetune', this run uses 'lwf'"),
    (dict(split={"num_tasks": 5}), r"belongs to a run of 2 tasks, this run has 5"),
    (dict(split={"num_tasks": 2, "class_names": [f"digit {i}" for i in range(10)]}), r"trained on classes"),
    (dict(data=load_digits_dataset(test_size=0.25)), r"trained on another data set"),
])
def test_resume_of_another_run_is_refused(tmp_path, processor, finished_run, change, match):
    out = copy_run(finished_run, tmp_path)
    refused(tmp_path, match + r".*overwrite_output_dir", lambda o: run(o, processor, resume=True, **change), out=out)


def test_resume_from_a_missing_folder(tmp_path, processor):
    refused(tmp_path, r"No finished task checkpoint at", lambda out: run(out, processor, resume=str(tmp_path / "nope")),
            error=FileNotFoundError)


def test_corrupt_weight_file_is_detected(tmp_path, processor, finished_run):
    out = copy_run(finished_run, tmp_path)
    weights = out / "task-0" / "clip" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit
    weights.write_bytes(bytes(data))
    refused(tmp_path, r"model.safetensors is corrupt: its sha256 is", lambda o: run(o, processor, resume=True), out=out)


def test_checkpoint_whose_class_list_and_prompts_disagree(tmp_path, processor, finished_run):
    out = copy_run(finished_run, tmp_path)
    config = out / "task-0" / "continual_clip.json"
    meta = json.loads(config.read_text())
    meta["class_names"] = meta["class_names"][:-1]
    write_json(str(config), meta, seal=True)
    state = json.loads((out / "task-0" / "continual_state.json").read_text())
    state["checksums"] = file_checksums(str(out / "task-0"), exclude=("continual_state.json",))  # not a corrupt file:
    write_json(str(out / "task-0" / "continual_state.json"), state, seal=True)  # a writer that disagreed with itself
    refused(tmp_path, r"lists 4 class names and 1 template\(s\) but holds prompts of shape \(5, 1",
            lambda o: run(o, processor, resume=True), out=out)


def test_bank_json_with_zero_classes(tmp_path):
    bank = FeatureBank()
    bank.add_classes([0, 1], {0: torch.randn(6, 8), 1: torch.randn(6, 8)}, train_contrastive=False)
    bank.save_pretrained(tmp_path / "bank")
    config = tmp_path / "bank" / "feature_bank.json"
    write_json(str(config), {**json.loads(config.read_text()), "num_classes": 0}, seal=True)  # a writer that erred
    with pytest.raises(ValueError, match=r"num_classes=0 .* holds 2 classes.*set num_classes to 2"):
        FeatureBank.from_pretrained(tmp_path / "bank")


def test_missing_local_model_path_is_reported_as_a_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No CLIP model folder at './no/such/clip'.*namespace/name"):
        ContinualCLIP.from_clip("./no/such/clip")


def test_missing_local_checkpoint_is_reported_as_a_path(tmp_path, digits):
    tasks = split_class_incremental(digits, num_tasks=2)
    missing = str(tmp_path / "runs" / "task-3")
    with pytest.raises(FileNotFoundError, match=r"No checkpoint folder at .*task-3"):
        ContinualTrainer.from_pretrained(missing, tasks=tasks, args=make_args(tmp_path / "out"))
    assert task_folders(tmp_path / "out") == []


# ----- images ----------------------------------------------------------------------------------
def test_float_and_16_bit_images_keep_their_contrast(processor):
    grey = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    rows = [
        {"image": Image.fromarray(grey), "label": 0},  # float in [0, 1]
        {"image": Image.fromarray((grey * 65535).astype(np.uint16)), "label": 0},  # 16-bit
        {"image": Image.fromarray((grey * 255).astype(np.uint8)).convert("RGB"), "label": 0},  # 8-bit reference
    ]
    pixels = ContinualCollator(processor.image_processor, {0: 0})(rows)["pixel_values"]
    assert torch.allclose(pixels[0], pixels[2], atol=0.05) and torch.allclose(pixels[1], pixels[2], atol=0.05)
    assert pixels[2].std() > 0.5  # a real gradient, not a black or white image


def test_nan_pixel_in_a_float_image_is_named(processor):
    bad = np.full((8, 8), 0.5, np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite pixel value"):
        ContinualCollator(processor.image_processor, {0: 0})([{"image": Image.fromarray(bad), "label": 0}])


# ----- data problems found before any work (issue #20) --------------------------------------------
def _paths_dataset(tmp_path, digits, n=40):
    """Digits saved as PNG files, the dataset's image column holding their paths (strings)."""
    names = digits["train"].features["label"].names
    rows = digits["train"].select(range(n))
    paths = []
    for i, image in enumerate(rows["image"]):
        paths.append(str(tmp_path / f"digit_{i}.png"))
        image.save(paths[-1])
    return Dataset.from_dict({"image": paths, "label": rows["label"]}).cast_column("label", ClassLabel(names=names))


def test_an_image_column_of_file_paths_is_read_as_images(tmp_path, digits, processor):
    data = _paths_dataset(tmp_path, digits, n=200)
    result = run(tmp_path / "out", processor, data, {"num_tasks": 2, "test_split": None})
    assert len(result.accuracy_matrix) == 2


def test_a_missing_image_file_is_named_with_its_row(tmp_path, digits, processor):
    data = _paths_dataset(tmp_path, digits, n=200)
    os.remove(tmp_path / "digit_7.png")
    refused(tmp_path, r"Row 7 of the training data: the image file .*digit_7\.png does not exist",
            lambda out: run(out, processor, data, {"num_tasks": 2}))


def test_a_none_image_is_named_with_its_row(tmp_path, digits, processor):
    rows = digits["train"].select(range(200))
    images = list(rows["image"])
    images[5] = None
    data = Dataset.from_dict({"image": images, "label": rows["label"]}, features=rows.features)
    refused(tmp_path, r"Row 5 of the training data: the image is missing \(None\)",
            lambda out: run(out, processor, data, {"num_tasks": 2}))


def test_a_truncated_png_is_named_with_its_row_and_file(tmp_path, digits, processor):
    images = tmp_path / "images"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (images / split / name).mkdir(parents=True)
            for i in range(4):
                digits["train"][i]["image"].save(images / split / name / f"{i}.png")
    broken = images / "test" / "dog" / "2.png"
    broken.write_bytes(broken.read_bytes()[:-30])  # a half-copied file: no end of image
    data = load_dataset("imagefolder", data_dir=str(images))
    refused(tmp_path, r"Row \d of the test data: the image .*dog/2\.png cannot be read .*truncated",
            lambda out: run(out, processor, data, {"num_tasks": 2}))


def test_an_empty_streamed_class_fails_before_training(tmp_path, digits, processor):
    train = digits["train"].filter(lambda y: y != 3, input_columns="label").to_iterable_dataset()
    data = {"train": train, "test": digits["test"].to_iterable_dataset()}
    from datasets import IterableDatasetDict

    refused(tmp_path, r"Class\(es\) \['three'\] have no training examples",
            lambda out: run(out, processor, IterableDatasetDict(data), {"num_tasks": 2}))


def test_empty_class_names_are_refused(tmp_path, processor):
    names = ["zero", "", "two", "three", "four", "five", "six", "seven", "eight", " "]
    refused(tmp_path, r"label\(s\) \[1, 9\] are empty",
            lambda out: run(out, processor, split={"num_tasks": 2, "class_names": names}))


def test_class_names_identical_after_truncation_are_refused_before_the_first_task(tmp_path, processor):
    long = "a very long class name that the tokenizer cuts before its end, number "
    names = [long + str(i) for i in range(10)]  # they differ beyond the 32 tokens of the tiny CLIP's prompts
    refused(tmp_path, r"give identical prompts once the tokenizer cuts every prompt to 32 tokens",
            lambda out: run(out, processor, split={"num_tasks": 5, "class_names": names}))


def test_lora_modules_to_save_that_match_nothing_are_refused():
    from peft import LoraConfig

    with pytest.raises(ValueError, match=r"modules_to_save \['nosuchmodule'\] match no module"):
        ContinualCLIP.from_clip(build_clip("tiny"), lora=LoraConfig(r=2, modules_to_save=["nosuchmodule"]))


def test_a_negative_lora_rank_is_refused_on_the_command_line(tmp_path):
    from hf_pmi.recipe import parse_run_args

    with pytest.raises(ValueError, match=r"lora_r=-1 is invalid: it must be an integer >= 0"):
        parse_run_args(["--output_dir", str(tmp_path), "--lora_r", "-1"])


def test_a_processor_of_another_image_size_is_refused_on_continue_and_resume(tmp_path, finished_run):
    from hf_pmi.testing import build_processor

    big = build_processor(image_size=64)
    out = copy_run(finished_run, tmp_path)
    refused(tmp_path, r"makes 64x64 images but the model takes 32x32.*AutoProcessor\.from_pretrained",
            lambda o: run(o, big, resume=True), out=out)
    # continuing: refused as a processor other than the checkpoint's own (#31), before the size check
    with pytest.raises(ValueError, match=r"prepares images differently.*given \{'shortest_edge': 64\}"):
        ContinualTrainer.from_pretrained(str(finished_run / "task-1"), tasks=["a new digit"], processing_class=big,
                                         args=make_args(tmp_path / "continued", method="finetune"))


def test_resuming_with_another_model_is_refused(tmp_path, processor, finished_run):
    from peft import LoraConfig

    out = copy_run(finished_run, tmp_path)
    for model, match in [(ContinualCLIP.from_clip(build_clip("mini")), r"vision\.hidden_size: checkpoint 32, this run 128"),
                         (ContinualCLIP.from_clip(build_clip("tiny"), lora=LoraConfig(r=2)), r"lora: checkpoint None")]:
        trainer = ContinualTrainer(model=model, args=make_args(out), processing_class=processor,
                                   tasks=split_class_incremental(_digits(), num_tasks=2))
        with pytest.raises(ValueError, match=match + r".*--model_size"):
            trainer.train(resume_from_checkpoint=True)
    assert task_folders(out) == ["task-0"]


@pytest.mark.parametrize("setting, match", [
    ({"eval_strategy": "steps", "eval_steps": 5}, r"eval_strategy='steps'.* evaluates after every task"),
    ({"save_strategy": "steps", "save_steps": 5}, r"save_strategy='steps' is not supported.*pickled optimizer"),
    ({"load_best_model_at_end": True}, r"load_best_model_at_end=True is not supported"),
    ({"do_train": False}, r"do_train=False is not supported.*zero_shot.*hf-pmi eval"),
])
def test_training_arguments_the_task_loop_does_not_support_are_refused(tmp_path, setting, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path / "out", **setting)
