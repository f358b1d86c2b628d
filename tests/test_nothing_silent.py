"""Nothing silent, round 2 (#31): each case goes through the door a user takes (a loader, the pipeline,
the CLI) and is refused with the cause and the fix, or made right."""

import json
import os
from pathlib import Path

import pytest
import torch

from hf_pmi.integrity import ChecksumError


def flip_a_bit(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture
def resnet_task(tmp_path):
    """A finished task folder of a BN-family run, as `save_task` writes it (model, processor, state)."""
    from transformers import ViTImageProcessorPil

    from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    from hf_pmi.resnet.checkpoint import save_task

    torch.manual_seed(0)
    config = ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=2, image_size=8,
                            id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    model = ResNet32ForImageClassification(config)
    processor = ViTImageProcessorPil(size={"height": 8, "width": 8})
    state = {"task_id": 0, "num_tasks": 1, "method": "finetune", "accuracy_matrix": [[1.0]], "task_classes": [[0, 1]]}
    return save_task(str(tmp_path / "run"), model, {"pool_y": torch.zeros(0, dtype=torch.long)}, state,
                     processor=processor)


@pytest.mark.parametrize("corrupt", ["weights", "id2label"])
def test_a_corrupt_resnet_task_folder_is_refused_by_automodel_and_pipeline(resnet_task, corrupt):
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    folder = resnet_task
    assert pipeline("image-classification", model=folder)(Image.new("RGB", (8, 8)))  # intact: serves
    if corrupt == "weights":
        flip_a_bit(Path(folder) / "model.safetensors")
        name = "model.safetensors"
    else:
        path = os.path.join(folder, "config.json")
        text = open(path).read()
        assert '"cat"' in text
        open(path, "w").write(text.replace('"cat"', '"cot"', 1))
        name = "config.json"
    with pytest.raises(ChecksumError, match=rf"{name} is corrupt.*Copy or download"):
        AutoModelForImageClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match=rf"{name} is corrupt"):  # transformers wraps the ChecksumError, text kept
        pipeline("image-classification", model=folder)


def test_verify_task_folder_serves_transformers_own_classes(resnet_task):
    """The documented call before a loader hf_pmi does not own; a plain model folder is not a task."""
    from hf_pmi.checkpoint import verify_task_folder

    assert verify_task_folder(resnet_task) is True
    os.remove(os.path.join(resnet_task, "preprocessor_config.json"))
    with pytest.raises(ChecksumError, match=r"preprocessor_config\.json is missing"):
        verify_task_folder(resnet_task)
    os.remove(os.path.join(resnet_task, "continual_state.json"))
    assert verify_task_folder(resnet_task) is False


# ----- LoRA bases: a relative local path is a path; a Hub base is pinned; no pickle is read from the Hub ----------
from hub_server import hub_client, hub_server  # noqa: E402,F401  (fixtures)


def _logits(model, processor):
    torch.manual_seed(0)
    return model(pixel_values=torch.randn(2, 3, 32, 32)).logits


def test_a_lora_model_on_a_relative_local_base_keeps_the_base(tmp_path, monkeypatch, processor):
    from peft import LoraConfig

    from hf_pmi import ContinualCLIP
    from hf_pmi.testing import build_clip

    monkeypatch.chdir(tmp_path)
    build_clip("tiny").save_pretrained("base")  # "base" is a valid Hub id too
    model = ContinualCLIP.from_clip("base", ["cat", "dog"], processor.tokenizer, lora=LoraConfig(r=2))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "continual_clip.json").read_text())
    assert meta["base_model_name_or_path"] is None and meta["base_saved"], meta
    assert (tmp_path / "ckpt" / "base" / "model.safetensors").is_file()
    reloaded = ContinualCLIP.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(_logits(reloaded.eval(), processor), _logits(model.eval(), processor))


def _upload(api, repo, folder, message):
    api.create_repo(repo, exist_ok=True)
    return api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=message).oid


def test_a_lora_checkpoint_on_a_hub_base_loads_the_commit_it_was_trained_on(tmp_path, hub_client, processor):
    from huggingface_hub import HfApi
    from peft import LoraConfig

    from hf_pmi import ContinualCLIP
    from hf_pmi.testing import build_clip

    api = HfApi(endpoint=hub_client.url)
    torch.manual_seed(1)
    build_clip("tiny").save_pretrained(tmp_path / "v1")
    first = _upload(api, "me/base", tmp_path / "v1", "v1")
    model = ContinualCLIP.from_clip("me/base", ["cat", "dog"], processor.tokenizer, lora=LoraConfig(r=2)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "continual_clip.json").read_text())
    assert meta["base_model_name_or_path"] == "me/base" and meta["base_model_revision"] == first
    torch.manual_seed(2)
    build_clip("tiny").save_pretrained(tmp_path / "v2")  # the base repo changes after training
    _upload(api, "me/base", tmp_path / "v2", "v2")
    reloaded = ContinualCLIP.from_pretrained(tmp_path / "ckpt").eval()
    assert reloaded.base_model_revision == first
    torch.testing.assert_close(_logits(reloaded, processor), _logits(model, processor))


def test_a_hub_base_with_only_pickled_weights_is_refused(tmp_path, hub_client):
    from huggingface_hub import HfApi

    from hf_pmi import ContinualCLIP
    from hf_pmi.resolve import UnsafeCheckpointError
    from hf_pmi.testing import build_clip

    clip = build_clip("tiny")
    (tmp_path / "bin").mkdir()
    clip.config.save_pretrained(tmp_path / "bin")
    torch.save(clip.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _upload(HfApi(endpoint=hub_client.url), "me/pickled", tmp_path / "bin", "bin only")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin, a pickle file.*save_pretrained"):
        ContinualCLIP.from_clip("me/pickled")


# ----- metrics over tasks that were not evaluated are not claimed --------------------------------------------------
def test_a_data_free_resnet_continuation_claims_no_forgetting_it_did_not_measure(tmp_path):
    from test_resnet_trainer import args, colours, schedule, tiny_resnet

    from hf_pmi import ContinualTrainer, split_class_incremental

    torch.set_num_threads(1)
    first = split_class_incremental(colours(["red", "green", "blue", "yellow"]), num_tasks=2, seed=None)
    ContinualTrainer(model=tiny_resnet(), args=args(tmp_path / "a", "finetune"), tasks=first, processing_class=None,
                     method_config=schedule(epochs=1, later_epochs=1)).train()
    new = split_class_incremental(colours(["cyan", "magenta"], seed=1), num_tasks=1, seed=None)
    trainer = ContinualTrainer.from_pretrained(str(tmp_path / "a" / "task-1"), tasks=new,
                                               args=args(tmp_path / "b", "finetune"),
                                               method_config=schedule(epochs=1, later_epochs=1))
    result = trainer.train()
    assert result.forgetting is None and result.bwt is None and result.unevaluated_tasks == [0, 1]
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["forgetting"] is None and saved["unevaluated_tasks"] == [0, 1]
    card = (tmp_path / "b" / "task-2" / "README.md").read_text()
    assert "tasks 0, 1 were not evaluated" in card and "all seen classes" not in card, card


# ----- flags that would silently train to NaN or evaluate on training images ---------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_resnet_recipe_refuses_a_non_finite_lr_before_reading_data(tmp_path, value):
    from hf_pmi.resnet.recipe import parse_args, run
    from hf_pmi.validation import ValidationError

    recipe, training = parse_args(["--output_dir", str(tmp_path / "out"), "--dataset_name", "no/such-data",
                                   "--learning_rate", value])
    with pytest.raises(ValidationError, match=rf"lr={value} is invalid: it must be a finite number > 0.*--learning_rate 0.1"):
        run(recipe, training)
    recipe, training = parse_args(["--output_dir", str(tmp_path / "out"), "--head_lr", value])
    with pytest.raises(ValidationError, match=r"head_lr=.* is invalid"):
        run(recipe, training)


@pytest.fixture
def image_folder(tmp_path):
    """<root>/{train,test}/<class>/*.png: two classes, three 8 px images each."""
    from PIL import Image

    for split in ("train", "test"):
        for name, colour in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), colour).save(tmp_path / "images" / split / name / f"{i}.png")
    return tmp_path / "images"


def test_a_misspelt_test_split_is_refused_naming_the_splits(tmp_path, image_folder):
    from hf_pmi.cli import main
    from hf_pmi.validation import ValidationError

    with pytest.raises(ValidationError, match=r"No 'tset' split in the data, which has the splits \['train', "
                                              r"'test'\].*--test_split test"):
        main(["train", "--model_name_or_path", "unused/model", "--data_dir", str(image_folder), "--test_split", "tset",
              "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    with pytest.raises(ValidationError, match=r"No 'trian' split.*--train_split"):
        main(["train", "--model_name_or_path", "unused/model", "--data_dir", str(image_folder), "--train_split", "trian",
              "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])


# ----- an output_dir inside another run's output folder or inside a finished task folder ---------------------------
def test_an_output_dir_inside_a_running_run_or_a_task_folder_is_refused_before_work(tmp_path, image_folder,
                                                                                    resnet_task):
    from hf_pmi.cli import main
    from hf_pmi.lock import RunLock, RunLockError

    def train(out):
        main(["train", "--model_name_or_path", "unused/model", "--data_dir", str(image_folder),
              "--output_dir", str(out), "--max_steps", "1"])

    outer = tmp_path / "outer"
    with RunLock(outer):  # a run writing to outer/: its task-1 does not exist yet
        with pytest.raises(RunLockError, match=r"inside .*outer, the output folder of another run, which is running "
                                               r"there.*Choose an output_dir outside it"):
            train(outer / "task-1")
    assert not (outer / "task-1").exists()
    with pytest.raises(RunLockError, match=r"inside .*task-0, a finished task folder.*uploaded with it"):
        train(os.path.join(resnet_task, "more"))
    with pytest.raises(RunLockError, match=r"a finished task folder"):  # the library door as well
        RunLock(os.path.join(resnet_task, "more")).acquire()


# ----- a failed push ends the command with exit status 1 and the retry command -------------------------------------
@pytest.fixture
def clip_folder(tmp_path):
    from hf_pmi.testing import build_clip, build_processor

    build_clip("tiny").save_pretrained(tmp_path / "clip")
    build_processor().save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_a_failed_push_exits_non_zero_with_the_retry_command(tmp_path, hub_client, clip_folder, image_folder, capsys):
    from hf_pmi.cli import main

    hub_client.fail_next_commits(3)  # the push of task-0 is refused, and its two retries
    with pytest.raises(SystemExit) as info:
        main(["train", "--model_name_or_path", str(clip_folder), "--data_dir", str(image_folder), "--num_tasks", "1",
              "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--method", "finetune", "--lora_r", "2",
              "--disable_tqdm", "true", "--push_to_hub", "true", "--hub_model_id", "tester/failing"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "1 push(es) to the Hub failed" in err and "hf upload tester/failing" in err and "--revision task-0" in err
    assert (tmp_path / "out" / "task-0" / "continual_state.json").is_file()  # the local checkpoint is intact


# ----- flags that would be silently reinterpreted, and advice that must be right ----------------------------------
def test_zero_classes_per_task_or_zero_max_steps_are_refused(tmp_path, image_folder):
    from hf_pmi.cli import main

    common = ["train", "--model_name_or_path", "unused/model", "--data_dir", str(image_folder),
              "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"max_steps=0 is invalid.*or -1.*drop --max_steps"):
        main([*common, "--max_steps", "0"])
    with pytest.raises(ValueError, match=r"classes_per_task=0 do not fit.*must be >= 1"):
        main([*common, "--max_steps", "1", "--initial_classes", "1", "--classes_per_task", "0"])


def test_duplicate_class_names_are_told_to_be_renamed_not_shortened(tmp_path, digits, processor):
    from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
    from hf_pmi.testing import build_clip
    from hf_pmi.validation import ValidationError

    names = ["one"] + [f"digit {i}" for i in range(8)] + ["one"]
    tasks = split_class_incremental(digits, num_tasks=2, seed=0, class_names=names)
    with pytest.raises(ValidationError, match=r"\['one'\] occur more than once.*Rename them.*'one \(1\)'") as info:
        ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), tasks=tasks, processing_class=processor,
                         args=ContinualConfig(output_dir=str(tmp_path / "out"), method="finetune", max_steps=1))
    assert "horten" not in str(info.value)
    long = "a " * 80
    with pytest.raises(ValidationError, match=r"differ only after the cut.*distinguishing words first"):
        ContinualCLIP.from_clip(build_clip("tiny"), [long + "cat", long + "dog"], processor.tokenizer)


def test_hf_pmi_eval_scores_a_resnet_task_folder_with_the_same_flags(resnet_task, tmp_path):
    """`hf-pmi eval` serves both families: a BatchNorm classifier's task folder is scored with its own model and
    processor, as `pipeline("image-classification")` predicts."""
    from PIL import Image
    from transformers import pipeline

    from hf_pmi.cli import EvalArguments, evaluate_checkpoint, main

    data = tmp_path / "data"
    for split in ("train", "test"):
        for k, name in enumerate(("cat", "dog")):
            (data / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i + 100 * k, 30, 200 - 90 * k)).save(data / split / name / f"{i}.png")
    assert main(["eval", "--checkpoint", resnet_task, "--data_dir", str(data)]) == 0
    scores = evaluate_checkpoint(EvalArguments(checkpoint=resnet_task, data_dir=str(data)))
    classify = pipeline("image-classification", model=resnet_task)
    hits = [classify(Image.open(p))[0]["label"] == p.parent.name for p in sorted((data / "test").glob("*/*.png"))]
    assert scores["examples"] == 6 and scores["accuracy"] == sum(hits) / 6
    assert scores["task_accuracy"] == [scores["accuracy"]]


def test_an_unknown_flag_is_a_usage_error_naming_it_and_the_closest_flag(tmp_path, capsys):
    from hf_pmi.cli import main
    from hf_pmi.resnet.recipe import parse_args

    with pytest.raises(SystemExit) as info:
        main(["train", "--output_dir", str(tmp_path), "--lerning_rate", "0.1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown flag --lerning_rate (did you mean --learning_rate?)" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", "x", "--tset_split", "test"])
    assert "did you mean --test_split?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--output_dir", str(tmp_path), "--num_taks", "5"])
    assert "did you mean --num_tasks?" in capsys.readouterr().err


def test_replay_buffers_of_equal_tensors_are_equal_files(tmp_path):
    """safetensors orders metadata by a hash map seeded anew for each save: the bytes are normalised (#31)."""
    from hf_pmi.synthesis import load_buffer, save_buffer

    files = set()
    for i in range(12):  # each save draws a new hash order: twelve saves hit both orders of two keys
        save_buffer(str(tmp_path / f"b{i}.safetensors"), torch.ones(2, 3), torch.tensor([0, 1]), torch.zeros(2, 4), 2)
        files.add((tmp_path / f"b{i}.safetensors").read_bytes())
    assert len(files) == 1
    samples, labels, targets, block = load_buffer(str(tmp_path / "b0.safetensors"))
    assert block == 2 and samples.shape == (2, 3) and labels.tolist() == [0, 1]


# ----- a continuation that would prepare images differently from the checkpoint ------------------------------------
def test_continuing_a_resnet_task_with_another_processor_is_refused(tmp_path, resnet_task):
    from test_resnet_trainer import args, colours

    from transformers import ViTImageProcessorPil

    from hf_pmi import ContinualTrainer, split_class_incremental
    from hf_pmi.validation import ValidationError

    new = split_class_incremental(colours(["cyan", "magenta"]), num_tasks=1, seed=None)
    with pytest.raises(ValidationError, match=r"prepares images differently.*size: checkpoint \{'height': 8, 'width': 8\}"
                                              r", given \{'height': 16, 'width': 16\}.*Leave processing_class out"):
        ContinualTrainer.from_pretrained(resnet_task, tasks=new, args=args(tmp_path / "b", "finetune"),
                                         processing_class=ViTImageProcessorPil(size={"height": 16, "width": 16}))
    with pytest.raises(ValidationError, match=r"image_mean: checkpoint \[0.5, 0.5, 0.5\], given \[0.1, 0.2, 0.3\]"):
        ContinualTrainer.from_pretrained(resnet_task, tasks=new, args=args(tmp_path / "b", "finetune"),
                                         processing_class=ViTImageProcessorPil(size={"height": 8, "width": 8},
                                                                               image_mean=[0.1, 0.2, 0.3]))
    from hf_pmi.validation import check_same_processor

    check_same_processor(resnet_task, ViTImageProcessorPil(size={"height": 8, "width": 8}), "it")  # the same: fine


def test_a_class_without_test_examples_is_named_in_a_warning(digits):
    from hf_pmi import split_class_incremental

    names = digits["test"].features["label"].names
    data = dict(digits)
    data["test"] = digits["test"].filter(lambda y: y != 3, input_columns="label")
    from datasets import DatasetDict

    with pytest.warns(UserWarning, match=rf"1 class\(es\) have no test examples and are never scored: \['{names[3]}'\]"):
        split_class_incremental(DatasetDict(data), num_tasks=2, seed=0)


def test_a_corrupt_resnet_task_on_the_hub_is_refused_by_automodel(tmp_path, hub_client, resnet_task):
    import shutil

    from huggingface_hub import HfApi
    from transformers import AutoModelForImageClassification

    api = HfApi(endpoint=hub_client.url)
    _upload(api, "me/r32", resnet_task, "task 0")
    assert AutoModelForImageClassification.from_pretrained("me/r32").config.id2label[0] == "cat"  # intact: loads
    bad = tmp_path / "bad"
    shutil.copytree(resnet_task, bad)
    flip_a_bit(bad / "model.safetensors")
    _upload(api, "me/r32-bad", bad, "a corrupt upload")
    with pytest.raises(ChecksumError, match=r"model\.safetensors is corrupt.*hf cache delete"):
        AutoModelForImageClassification.from_pretrained("me/r32-bad")
