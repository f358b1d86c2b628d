"""The `hf-pmi` command and the CIFAR-100 / ImageNet-R recipes, run as a user would (subprocesses, offline,
a tiny CLIP and a generated image folder)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--max_steps", "1", "--per_device_train_batch_size", "16", "--disable_tqdm", "true", "--method", "finetune",
        "--lora_r", "2"]


def run(cmd, timeout=300):
    # PYTHONPATH: this checkout's hf_pmi, also for `python recipes/x.py` (whose sys.path[0] is recipes/)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory, digits):
    """A tiny CLIP + processor in a folder; digits as an image folder with train/ and test/, and one with train/ only."""
    from hf_pmi.testing import build_clip, build_processor

    root = tmp_path_factory.mktemp("world")
    build_clip("tiny").save_pretrained(root / "clip")
    build_processor().save_pretrained(root / "clip")
    names = digits["train"].features["label"].names
    for split, n in (("train", 150), ("test", 80)):
        for i, row in enumerate(digits[split].select(range(n))):
            for target in ([root / "images", root / "train_only"] if split == "train" else [root / "images"]):
                folder = target / split / names[row["label"]]
                folder.mkdir(parents=True, exist_ok=True)
                row["image"].save(folder / f"{i}.png")
    return root


def test_hf_pmi_help_lists_the_commands_and_the_version():
    out = run([sys.executable, "-m", "hf_pmi.cli", "--help"]).stdout
    assert "train" in out and "eval" in out and "usage: hf-pmi" in out and "--version" in out
    from hf_pmi import __version__

    assert run([sys.executable, "-m", "hf_pmi.cli", "--version"]).stdout.startswith(f"hf-pmi {__version__} (torch ")


def test_train_help_reads_by_config_and_pmi_is_the_default_method():
    short = run([sys.executable, "-m", "hf_pmi.cli", "train", "--help"]).stdout
    assert short.count("\n") < 100 and "--output_dir" in short and "--help-all lists all" in short  # two screens
    assert "(default: pmi)" in short and "--inversion_batch_size" not in short
    text = run([sys.executable, "-m", "hf_pmi.cli", "train", "--help-all"]).stdout
    titles = ["recipe (RecipeArguments):", "continual run (ContinualConfig):", "replay training (ReplayConfig):",
              "inversion (InversionConfig):", "Trainer (transformers.TrainingArguments, with hf_pmi's defaults):"]
    where = [text.index(t) for t in titles]
    assert where == sorted(where)  # recipe, continual run, the method's groups, then the Trainer's
    assert where[0] < text.index("--class_order_file") < where[1] < text.index("--method") < where[2]
    assert where[2] < text.index("--replay_batch_size") < where[3] < text.index("--inversion_batch_size") < where[4]
    assert where[4] < text.index("--per_device_train_batch_size")
    # a short usage line, not every flag twice: each flag once is ~830 lines (twice would be ~1600)
    assert text.count("\n") < 1000 and text.index("options:") < 200
    from hf_pmi.config import ContinualConfig
    from hf_pmi.methods.pmi import PMIConfig
    from hf_pmi.recipe import parse_run_args

    recipe, args, method_config = parse_run_args(["--output_dir", "out"])
    assert args.method == "pmi" and isinstance(method_config, PMIConfig)
    assert ContinualConfig(output_dir="out").method == "pmi"


def test_cli_train_then_eval_agree(tmp_path, world):
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "hf_pmi.cli", "train", "--model_name_or_path", str(world / "clip"),
                "--data_dir", str(world / "images"), "--num_tasks", "2", "--output_dir", str(out), *FAST])
    assert "A_last" in proc.stdout and "[hf_pmi] task 1/1" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    scores_file = tmp_path / "scores.json"
    run([sys.executable, "-m", "hf_pmi.cli", "eval", "--checkpoint", str(out / "task-1"), "--data_dir",
         str(world / "images"), "--output_file", str(scores_file)])
    scores = json.loads(scores_file.read_text())
    assert scores["classes"] == 10 and scores["examples"] == sum(results["counts"])
    assert scores["accuracy"] == pytest.approx(results["all_seen_accuracy"][-1])
    assert scores["task_accuracy"] == pytest.approx(results["accuracy_matrix"][-1])


def test_cifar100_recipe_with_class_order_file_and_first_task_size(tmp_path, world):
    order = [9, 3, 0, 7, 1, 2, 8, 4, 6, 5]
    (tmp_path / "order.json").write_text(json.dumps(order))
    out = tmp_path / "cifar"
    run([sys.executable, "recipes/clip_cifar100.py", "--model_name_or_path", str(world / "clip"), "--data_dir",
         str(world / "images"), "--image_column", "image", "--label_column", "label", "--initial_classes", "4",
         "--classes_per_task", "3", "--class_order_file", str(tmp_path / "order.json"), "--output_dir", str(out),
         *FAST])
    results = json.loads((out / "results.json").read_text())
    assert results["class_order"] == order and len(results["accuracy_matrix"]) == 3
    state = json.loads((out / "task-2" / "continual_state.json").read_text())
    assert [len(ids) for ids in state["task_classes"]] == [4, 3, 3]
    card = (out / "task-2" / "README.md").read_text()
    assert "imagefolder" not in card.split("---")[1]  # a local folder is no dataset id
    assert f"`{', '.join(map(str, order))}`" in card


def test_imagenet_r_recipe_holds_out_a_test_split(tmp_path, world):
    out = tmp_path / "inr"
    run([sys.executable, "recipes/clip_imagenet_r.py", "--model_name_or_path", str(world / "clip"), "--data_dir",
         str(world / "train_only"), "--num_tasks", "2", "--class_order_seed", "0", "--output_dir", str(out), *FAST])
    results = json.loads((out / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 2
    assert sum(results["counts"]) == 30  # 20 % of the 150 training images, held out


def test_a_config_file_sets_flags_the_command_line_overrides(tmp_path, capsys):
    """``--config run.yaml`` (trl's parser offers it): the file's flags are defaults, the command line wins, and a
    misspelt setting in the file is a usage error naming it and the closest flag."""
    import pytest

    from hf_pmi.recipe import parse_run_args

    config = tmp_path / "run.yaml"
    config.write_text("method: lwf\nlearning_rate: 0.01\nlwf_temperature: 3.0\nnum_tasks: 2\n")
    recipe, args, method_config = parse_run_args(["--config", str(config), "--output_dir", str(tmp_path / "o"),
                                                  "--learning_rate", "0.02"])
    assert (args.method, args.learning_rate, method_config.temperature, recipe.num_tasks) == ("lwf", 0.02, 3.0, 2)
    config.write_text("lerning_rate: 1\n")
    with pytest.raises(SystemExit):
        parse_run_args(["--config", str(config), "--output_dir", str(tmp_path / "o")])
    assert "did you mean learning_rate" in capsys.readouterr().err
