"""The ResNet recipes (``recipes/resnet32_cifar100.py``, ``recipes/resnet_tiny_imagenet.py``) and `tensor_tasks`,
offline, on generated image folders of constant-colour images."""

import importlib.util
import json
import os

import pytest
import torch
from PIL import Image

from hf_pmi.data import split_class_incremental
from hf_pmi.resnet.data import tensor_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# four classes, each one saturated colour: learnable in a few steps from scratch
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 230), "yellow": (230, 220, 20)}
SIZE = 16  # px of the generated images
TINY = ["--num_tasks", "2", "--image_size", str(SIZE), "--blocks_per_stage", "1", "--epochs", "4", "--later_epochs", "1",
        "--head_epochs", "1", "--per_device_train_batch_size", "8", "--method", "finetune"]


def write_folder(root, n_train=10, n_test=4, broken=None):
    """``root/{train,test}/<colour>/<i>.png``; `broken`: a (split, colour) whose first file is not a PNG."""
    for split, n in (("train", n_train), ("test", n_test)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (SIZE, SIZE), rgb).save(folder / f"{i}.png")
    if broken:
        (root / broken[0] / broken[1] / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "recipes", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores shared with other work
    yield
    torch.set_num_threads(threads)


def test_tensor_tasks_shapes_labels_and_normalisation(folder):
    from datasets import load_dataset

    tasks = split_class_incremental(load_dataset("imagefolder", data_dir=str(folder)), num_tasks=2, seed=1993)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    tt = tensor_tasks(tasks, image_size=8, mean=mean, std=std, progress=False)
    assert [t.class_ids for t in tt] == [[0, 1], [2, 3]]
    assert tuple(tt[0].x.shape) == (20, 3, 8, 8) and tuple(tt[1].x_test.shape) == (8, 3, 8, 8)
    assert torch.equal(tt[1].y.unique(), torch.tensor([2, 3])) and torch.equal(tt[0].y_test.unique(), torch.tensor([0, 1]))
    for t in tt:  # every image is one colour: each channel equals (value / 255 - mean) / std
        for x, y in ((t.x, t.y), (t.x_test, t.y_test)):
            for image, label in zip(x, y):
                rgb = COLOURS[tasks.class_names[label]]
                want = torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, mean, std)]).view(3, 1, 1)
                assert torch.allclose(image, want.expand_as(image), atol=1e-5)


def test_tensor_tasks_refuses_broken_image_and_missing_test(tmp_path):
    from datasets import load_dataset

    data = load_dataset("imagefolder", data_dir=str(write_folder(tmp_path, 3, 2, broken=("test", "blue"))))
    tasks = split_class_incremental(data, num_tasks=2, seed=None, verify_images=False)
    with pytest.raises(ValueError, match=r"Row \d+ of task \d's test data: the image cannot be decoded.*drop"):
        tensor_tasks(tasks, image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, progress=False)
    no_test = split_class_incremental(data["train"], num_tasks=2, seed=None)
    with pytest.raises(ValueError, match="Task 0 .* has no test data.*--test_size"):
        tensor_tasks(no_test, image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, progress=False)


@pytest.mark.parametrize("recipe", ["resnet32_cifar100", "resnet_tiny_imagenet"])
def test_recipe_runs_and_writes_results(recipe, folder, tmp_path, capsys):
    main = load_recipe(recipe).main
    argv = ["--data_dir", str(folder), "--test_split", "test", "--output_dir", str(tmp_path / "out"), *TINY]
    result = main(argv)
    matrix = result["accuracy_matrix"]
    assert len(matrix) == 2 and matrix[0][1] is None and None not in matrix[1]
    assert matrix[0][0] > 0.5  # 2 classes after task 0: above chance
    with open(tmp_path / "out" / "results.json") as f:
        saved = json.load(f)
    assert saved["accuracy_matrix"] == matrix and saved["config"]["method"] == "finetune"
    assert saved["recipe"]["image_size"] == SIZE and len(saved["class_order"]) == len(COLOURS)
    assert "after \\ on" in capsys.readouterr().out  # the printed accuracy matrix
    if recipe == "resnet32_cifar100":  # a rerun resumes after the last finished task: nothing left to train
        assert main(argv)["accuracy_matrix"] == matrix


def test_recipe_defaults_follow_the_reference():
    from hf_pmi.resnet.recipe import parse_args

    tiny_defaults = load_recipe("resnet_tiny_imagenet").DEFAULTS
    recipe, training = parse_args(["--output_dir", "o"], tiny_defaults)
    config = training.continual_config(recipe.num_tasks, num_classes=200, dataset=recipe.reference_dataset)
    assert (recipe.dataset_name, recipe.test_split, recipe.image_size) == ("zh-plus/tiny-imagenet", "valid", 64)
    assert (config.init_samples, config.per_task_samples) == (6000, 5000)  # task_cont_tiny_5_task.sh
    assert (config.inversion.refine_batch, config.weights["l_ft"]) == (1000, 1.5)
    assert (config.schedule, config.regenerate, config.selection, config.flip, config.shift) == ("staged", True, "cfs", True, 4)
    recipe, training = parse_args(["--output_dir", "o", "--num_tasks", "20"], tiny_defaults)
    assert training.continual_config(20, 200, recipe.reference_dataset).stage_lrs == (0.1, 0.05, 5e-3)  # Tiny: 5e-3
    recipe, training = parse_args(["--output_dir", "o", "--num_tasks", "20"])
    config = training.continual_config(recipe.num_tasks, num_classes=100, dataset=recipe.reference_dataset)
    assert (config.init_samples, config.per_task_samples, config.stage_lrs[-1]) == (2000, 1000, 1e-2)  # CIFAR 20 tasks
    recipe, training = parse_args(["--output_dir", "o", "--replay_per_class", "7"])
    assert training.continual_config(5, 100).replay_per_class == 7 and training.continual_config(5, 100).init_samples is None
    with pytest.raises(ValueError, match="unknown flags"):
        parse_args(["--output_dir", "o"], {"epoch": 3})


def test_recipes_default_to_the_references_readings_that_the_library_does_not_share():
    from hf_pmi.resnet.continual import ResNetContinualConfig, black_fill
    from hf_pmi.resnet.recipe import parse_args

    tiny_defaults = load_recipe("resnet_tiny_imagenet").DEFAULTS
    recipe, training = parse_args(["--output_dir", "o"], tiny_defaults)
    config = training.continual_config(5, 200, recipe.reference_dataset, recipe.mean, recipe.std)
    assert (config.loss_form, config.target_classes, config.head_counts, config.last_stage) == (
        "product", "random", "running", "block")
    assert config.crop_fill == black_fill(tiny_defaults["mean"], tiny_defaults["std"])  # ImageNet's black
    library = ResNetContinualConfig()
    assert (library.loss_form, library.target_classes, library.head_counts, library.crop_fill) == ("sum", "equal", "fixed", None)
    recipe, training = parse_args(["--output_dir", "o", "--loss_form", "sum", "--crop_fill", "mean", "--last_stage", "stage"])
    config = training.continual_config(5, 100)
    assert (config.loss_form, config.crop_fill, config.last_stage) == ("sum", None, "stage")


def test_bad_input_fails_before_training(tmp_path, capsys):
    main = load_recipe("resnet32_cifar100").main
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match="no-such-folder.*--data_dir|--data_dir.*no-such-folder"):
        main(["--data_dir", str(missing), "--output_dir", str(tmp_path / "out"), *TINY])
    with pytest.raises(SystemExit):
        main(["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--method", "magic"])
    err = capsys.readouterr().err
    assert "magic" in err and "finetune" in err and "pmi" in err  # argparse lists the choices
    with pytest.raises(ValueError, match="--hub_model_id"):
        main(["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--push_to_hub"])
    with pytest.raises(FileNotFoundError, match="model folder"):
        main(["--data_dir", str(missing), "--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(missing)])
    from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification

    ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, num_labels=0, image_size=32)).save_pretrained(
        tmp_path / "model")
    with pytest.raises(ValueError, match="pass --image_size 32"):
        main(["--data_dir", str(write_folder(tmp_path / "data", 2, 1)), "--output_dir", str(tmp_path / "out"),
              "--model_name_or_path", str(tmp_path / "model"), *TINY])
    assert not (tmp_path / "out" / "task-0").exists()


def test_recipe_pmi_regenerates_the_pool_after_every_task(folder, tmp_path):
    """The default method through the recipe's flags, at a toy inversion budget."""
    argv = ["--data_dir", str(folder), "--output_dir", str(tmp_path / "out"), *TINY, "--method", "pmi",
            "--replay_per_class", "4", "--inversion_layer_steps", "1", "--inversion_refine_steps", "2"]
    result = load_recipe("resnet32_cifar100").main(argv)
    # the reference's pool: task 0's classes inverted after task 0 and again after task 1 (saved last task)
    assert result["inversion_passes"] > 0 and sorted(result["inverted_classes"].values()) == [1, 1, 2, 2]
    with open(tmp_path / "out" / "results.json") as f:
        config = json.load(f)["config"]
    assert (config["replay_per_class"], config["inversion"]["layer_steps"], config["inversion"]["refine_steps"]) == (4, 1, 2)


def test_hf_pmi_train_runs_the_batchnorm_family_with_trainer_flag_names(folder, tmp_path):
    """`hf-pmi train --family batchnorm` takes the ResNet recipes' flags, named as Trainer names them
    (--learning_rate, --per_device_train_batch_size, --gradient_accumulation_steps, --max_grad_norm)."""
    from hf_pmi.cli import main

    out = tmp_path / "out"
    assert main(["train", "--family", "batchnorm", "--data_dir", str(folder), "--test_split", "test",
                 "--output_dir", str(out), *TINY, "--learning_rate", "0.05", "--gradient_accumulation_steps", "2",
                 "--max_grad_norm", "5"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["accuracy_matrix"]) == 2 and saved["config"]["lr"] == 0.05 and saved["config"]["batch_size"] == 8


def test_the_resnet_recipe_runs_on_two_gloo_processes(folder, tmp_path):
    """Two real CPU processes (gloo) through ContinualTrainer: the main process alone writes the task folders and
    results, and gives the folder's lock back (the loop's numbers against one process: tests/test_resnet_loop.py)."""
    import subprocess
    import sys

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/resnet32_cifar100.py", "--data_dir",
           str(folder), "--test_split", "test", "--output_dir", str(out), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["processes"] == 2 and len(saved["accuracy_matrix"]) == 2
    assert (out / "task-1" / "continual_state.json").exists() and not (out / ".hf_pmi_run.lock").exists()
    assert proc.stdout.count("after \\ on") == 1  # one process reports


def test_batchnorm_help_lists_trainer_flag_names(capsys):
    from hf_pmi.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--family", "batchnorm", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--learning_rate" in text and "--per_device_train_batch_size" in text and "40 % and 60 %" in text
    assert "--lr " not in text and "--batch_size " not in text
