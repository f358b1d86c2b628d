"""benchmarks/multi_seed.py: mean ± std over seeds of any recipe, and the accuracy-vs-seen-classes plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(folder, seed, a_last, curve, task_classes):
    folder.mkdir(parents=True)
    results = {"method": "pmi", "seed": seed, "a_last": a_last, "a_avg": float(np.mean(curve)), "forgetting": 0.1,
               "bwt": -0.1, "all_seen_accuracy": curve, "class_names": [str(i) for i in range(6)],
               "accuracy_matrix": [[None] * len(curve)] * len(curve)}
    (folder / "results.json").write_text(json.dumps(results))
    task = folder / f"task-{len(curve) - 1}"
    task.mkdir()
    (task / "continual_state.json").write_text(json.dumps({"task_classes": task_classes}))
    return folder / "results.json"


def test_gathers_finished_runs_into_mean_std_and_a_plot(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import multi_seed

    split = [[0, 1, 2, 3], [4], [5]]  # a first task of 4 classes, then 1 and 1: seen 4, 5, 6
    fake_run(tmp_path / "a", 0, 0.5, [0.9, 0.7, 0.5], split)
    fake_run(tmp_path / "b", 1, 0.7, [0.8, 0.8, 0.7], split)
    summary = multi_seed.main(["--results", str(tmp_path / "*" / "results.json"), "--output_dir", str(tmp_path / "s")])
    assert summary["a_last"]["mean"] == pytest.approx(0.6) and summary["a_last"]["std"] == pytest.approx(0.1414, 1e-3)
    assert summary["curve"]["seen_classes"] == [4, 5, 6]
    assert summary["curve"]["mean"] == pytest.approx([0.85, 0.75, 0.6])
    assert (tmp_path / "s" / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["seeds"] == [0, 1]
    fake_run(tmp_path / "c", 2, 0.7, [0.8, 0.7, 0.6], [[0, 1], [2, 3], [4, 5]])
    with pytest.raises(ValueError, match="differently"):
        multi_seed.aggregate([str(tmp_path / x / "results.json") for x in "ac"])


def test_runs_a_recipe_over_seeds(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "benchmarks/multi_seed.py", "--recipe", "recipes/clip_digits.py", "--seeds", "0", "1",
           "--output_dir", str(tmp_path), "--", "--model_size", "tiny", "--backbone", "scratch", "--num_tasks", "2",
           "--method", "finetune", "--max_steps", "1", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["a_last"]["values"]) == 2
    assert summary["curve"]["seen_classes"] == [5, 10]
    assert "a_last" in proc.stdout and "±" in proc.stdout
