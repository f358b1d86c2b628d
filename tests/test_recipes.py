"""The recipes run end to end, as a user would launch them (subprocesses, offline)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "16", "--disable_tqdm", "true", "--report_to", "none"]


def run(cmd, env_extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env_extra or {})}  # this checkout's hf_pmi
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def accelerate(*args):
    return [sys.executable, "-m", "accelerate.commands.launch", *args]


def check_results(path, method, num_tasks):
    results = json.loads(open(path).read())
    assert results["method"] == method
    assert len(results["accuracy_matrix"]) == num_tasks
    assert all(len(row) == num_tasks for row in results["accuracy_matrix"])
    assert results["accuracy_matrix"][0][1] is None
    for key in ("a_last", "a_avg", "forgetting", "bwt", "wall_seconds", "class_order", "class_names", "seed"):
        assert key in results
    return results


def test_digits_recipe_single_process(tmp_path):
    out = tmp_path / "digits"
    proc = run(accelerate("--num_processes", "1", "--cpu", "recipes/clip_digits.py", "--output_dir", str(out),
                          "--model_size", "tiny", "--backbone", "scratch", "--num_tasks", "2", "--method", "finetune",
                          *FAST))
    check_results(out / "results.json", "finetune", 2)
    assert "A_last" in proc.stdout


def test_digits_recipe_two_processes_gloo(tmp_path):
    """Two real CPU processes (gloo): same result layout; metrics gathered over both ranks."""
    single, double = tmp_path / "one", tmp_path / "two"
    common = ["recipes/clip_digits.py", "--model_size", "tiny", "--backbone", "scratch", "--num_tasks", "2",
              "--method", "finetune", *FAST]
    run(accelerate("--num_processes", "1", "--cpu", *common[:1], "--output_dir", str(single), *common[1:]))
    run(accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", common[0], "--output_dir", str(double), *common[1:]),
        env_extra={"ACCELERATE_USE_CPU": "true"})
    one = check_results(single / "results.json", "finetune", 2)
    two = check_results(double / "results.json", "finetune", 2)
    assert set(one) == set(two)
    assert one["counts"] == two["counts"]  # every test example counted once, not once per rank
    assert (double / "task-1" / "continual_state.json").exists()
    assert not (double / ".hf_pmi_run.lock").exists()  # the main process held the folder and gave it back


@pytest.fixture
def local_clip_and_images(tmp_path, digits):
    """A tiny CLIP + processor saved to a folder, and digits written as an image folder."""
    from hf_pmi.testing import build_clip, build_processor

    model_dir = tmp_path / "clip"
    build_clip("tiny").save_pretrained(model_dir)
    build_processor().save_pretrained(model_dir)
    names = digits["train"].features["label"].names
    for split in ("train", "test"):
        ds = digits[split].select(range(200))
        for i, row in enumerate(ds):
            folder = tmp_path / "images" / split / names[row["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            row["image"].save(folder / f"{i}.png")
    return model_dir, tmp_path / "images"


def test_cub200_recipe_runs_on_a_local_model_and_image_folder(tmp_path, local_clip_and_images):
    model_dir, images = local_clip_and_images
    out = tmp_path / "cub"
    run([sys.executable, "recipes/clip_cub200.py", "--model_name_or_path", str(model_dir), "--data_dir", str(images),
         "--num_tasks", "2", "--method", "finetune", "--lora_r", "4", "--output_dir", str(out), *FAST],
        env_extra={"HF_HUB_OFFLINE": "1"})
    results = check_results(out / "results.json", "finetune", 2)
    assert len(results["class_names"]) == 10
    assert (out / "task-1" / "adapter" / "adapter_config.json").exists()


def test_pmi_two_processes_shards_synthesis(tmp_path):
    """PMI with replay synthesis sharded over two gloo processes, on the default letters backbone with LoRA,
    pre-trained once in a process of its own (an empty cache: both ranks ask for it): bank, cost report and
    grid are written, and the checkpoint reloads without the backbone's cache."""
    out, cache = tmp_path / "pmi2", tmp_path / "cache"
    run(accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "recipes/clip_digits.py", "--output_dir", str(out), "--model_size", "tiny",
                   "--num_tasks", "2", "--method", "pmi", "--inversion_layer_steps", "3", "--inversion_first_block_steps", "4",
                   "--inversion_upsample_at", "1", "2", "3", "--inversion_refine_steps", "3", *FAST),
        env_extra={"ACCELERATE_USE_CPU": "true", "HF_PMI_CACHE": str(cache)})
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # trained once
    check_results(out / "results.json", "pmi", 2)
    state = json.loads((out / "task-1" / "continual_state.json").read_text())
    assert state["method_info"]["inversion"]["full_model_passes"] > 0
    assert (out / "task-1" / "replay_samples.png").exists()
    from hf_pmi import ContinualCLIP, FeatureBank

    assert FeatureBank.from_pretrained(out / "task-1" / "feature_bank").num_classes == 10
    meta = json.loads((out / "task-1" / "continual_clip.json").read_text())
    assert meta["lora"]["r"] == 16 and meta["base_saved"]  # the cached backbone is no home: weights kept
    assert len(ContinualCLIP.from_pretrained(out / "task-1").class_names) == 10


def test_names_only_task_over_two_processes(tmp_path):
    """The shapes recipe with its last task learned from names only, over two gloo processes: the
    boundary distillation's raw-CLIP pass (adapters switched off) and the one-forward loss run under
    DDP, and the names-only class is evaluated and marked in the card."""
    out = tmp_path / "names2"
    run(accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "recipes/clip_shapes.py", "--output_dir", str(out), "--num_tasks", "2",
                   "--pretrain_steps", "3", "--backbone_dir", str(tmp_path / "cache"), "--images_per_class", "8",
                   "--test_images_per_class", "2", "--replay_batch_size", "8", "--inversion_layer_steps", "2",
                   "--inversion_first_block_steps", "4", "--inversion_upsample_at", "1", "2", "3", "--inversion_refine_steps", "2", "--sampling_per_class", "2",
                   "--names_only_per_class", "4", "--names_only_num_train_epochs", "2", "--replay_grid_samples", "0", *FAST),
        env_extra={"ACCELERATE_USE_CPU": "true"}, timeout=600)
    results = check_results(out / "results.json", "pmi", 2)
    assert results["accuracy_matrix"][1][1] is not None
    assert "learned from its name only" in (out / "task-1" / "README.md").read_text()
