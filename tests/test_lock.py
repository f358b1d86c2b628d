"""One writer per output_dir: a second run is refused before any work, naming the running one; a lock left by
a killed run is detected, explained and taken over."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.lock import LOCK_NAME, RunLockError
from hf_pmi.testing import build_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
SMALL = ["--backbone", "scratch", "--model_size", "tiny", "--num_tasks", "2", "--max_steps", "2",
         "--per_device_train_batch_size", "16", "--disable_tqdm", "true", "--report_to", "none"]
PMI = ["--method", "pmi", "--inversion_layer_steps", "2", "--inversion_first_block_steps", "4",
       "--inversion_upsample_at", "1", "2", "3", "--inversion_refine_steps", "2", "--sampling_per_class", "2",
       "--sampling_selection", "gaussian", "--replay_grid_samples", "0"]


def wait_for(path, proc, timeout=300):
    start = time.monotonic()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() - start < timeout, f"{path} never appeared"
        time.sleep(0.2)


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_first(tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", "import kill_points; kill_points.main()", f"pause:{go}", "recipes/clip_digits.py",
         "--output_dir", str(out), *SMALL, *PMI, "--seed", "1"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(f"{go}.waiting", first)  # task 0 trained, its checkpoint about to be written: the folder is held
        second = subprocess.run([sys.executable, "recipes/clip_digits.py", "--output_dir", str(out), *SMALL,
                                 "--method", "finetune", "--seed", "2"],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0
        assert "Another run is writing to" in second.stderr and f"process {first.pid} " in second.stderr
        assert "[hf_pmi] task" not in second.stdout  # refused before any work
        go.touch()
        log, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, log[-3000:]
    for t in range(2):  # the first run's checkpoints, whole: its method and seed everywhere
        task = out / f"task-{t}"
        state = json.loads((task / "continual_state.json").read_text())
        assert (state["method"], state["seed"]) == ("pmi", 1)
        assert "method pmi" in (task / "README.md").read_text()
        assert (task / "feature_bank" / "feature_bank.safetensors").is_file()
        ContinualCLIP.from_pretrained(task)  # checksums verified
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_lock_left_by_a_killed_run_is_explained_and_taken_over(tmp_path, digits, processor, caplog):
    import logging

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hf_pmi.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('held', flush=True); time.sleep(600)", str(out)],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        tasks = split_class_incremental(digits, num_tasks=2, seed=0)
        args = ContinualConfig(output_dir=str(out), method="finetune", max_steps=1, per_device_train_batch_size=16,
                               disable_tqdm=True, seed=0)

        def trainer():
            return ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=args, tasks=tasks,
                                    processing_class=processor)

        with pytest.raises(RunLockError, match=f"Another run is writing to .*process {holder.pid} .*kill {holder.pid}"):
            trainer()
        os.kill(holder.pid, signal.SIGKILL)  # the run dies without releasing anything
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (out / LOCK_NAME).read_text()  # the lock file is still there
    with caplog.at_level(logging.WARNING, logger="hf_pmi"):
        trainer().train()
    assert f"process {holder.pid} " in caplog.text and "crashed or was killed" in caplog.text
    assert (out / "task-1" / "continual_state.json").exists() and not (out / LOCK_NAME).exists()
