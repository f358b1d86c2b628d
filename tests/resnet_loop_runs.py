"""Small fonts runs of the BatchNorm family's loop, and the numbers the hand-written SGD loop gave for them before
the loop moved into `transformers.Trainer` (issue 30, part 2): ``tests/fixtures/resnet_loop_reference.json``.

    PYTHONPATH=. python tests/resnet_loop_runs.py   # rewrites the fixture (only with the old loop: it is the baseline)
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "resnet_loop_reference.json")
# (method, schedule): every loss path of the loop (plain CE, LwF's KD, replay of inverted and of real samples,
# the head fine-tuning) and both schedules (multi-step stages, one-cycle)
RUNS = [("finetune", "staged"), ("lwf", "staged"), ("pmi", "staged"), ("exemplar_replay", "staged"),
        ("finetune", "one_cycle")]


def fonts_tasks(num_tasks: int = 3, per_task: int = 2, train_per_class: int = 10, test_per_class: int = 6):
    """`TensorTask`s of the offline fonts letters at 16 px: 10 training images per class, so a task's 20 images
    make batches of 8, 8 and 4 (a short last batch)."""
    from hf_pmi.resnet.continual import TensorTask
    from hf_pmi.testing.fonts import font_letters_images

    classes = num_tasks * per_task

    def tensors(n, seed):
        images, labels = font_letters_images(n, classes, 16, seed)
        return torch.tensor(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5, torch.tensor(labels)

    x, y = tensors(train_per_class, 5)
    xt, yt = tensors(test_per_class, 6)
    tasks = []
    for k in range(0, classes, per_task):
        m, mt = (y >= k) & (y < k + per_task), (yt >= k) & (yt < k + per_task)
        tasks.append(TensorTask(list(range(k, k + per_task)), x[m], y[m], xt[mt], yt[mt]))
    return tasks


def small_config(method: str, schedule: str = "staged", seed: int = 0):
    from hf_pmi.resnet.continual import ResNetContinualConfig
    from hf_pmi.resnet.inversion import BNInversionConfig

    return ResNetContinualConfig(
        method=method, schedule=schedule, seed=seed, epochs=3, later_epochs=3, stage_epochs=(1, 1, 1), batch_size=8,
        head_epochs=1, replay_per_class=4, flip=True, progress=False,
        inversion=BNInversionConfig(layer_steps=2, refine_steps=2))  # a tiny budget: the loop is under test


def small_model(seed: int = 0):
    from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification

    torch.manual_seed(seed)
    return ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=0, image_size=16))


def weights_digest(model) -> str:
    """sha256 of every tensor of the state dict, in order: equal digests mean bit-equal weights."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(method: str, schedule: str, **kwargs) -> dict:
    from hf_pmi.resnet.continual import learn_tasks

    model = small_model()
    out = learn_tasks(model, fonts_tasks(), small_config(method, schedule), **kwargs)
    return {"accuracy_matrix": out["accuracy_matrix"], "losses": out["losses"], "weights": weights_digest(model)}


def distributed_run(out: str, method: str, batch_size: int) -> None:
    """One run under `accelerate launch` (one or several processes): 24 training images per task (batches divide
    evenly over 2 processes), no augmentation (each process would draw other crops), no clipping; process 0 writes
    the accuracy matrix and the weights to `out`."""
    import dataclasses

    from accelerate import PartialState
    from safetensors.torch import save_file
    from transformers import TrainingArguments

    from hf_pmi.resnet.continual import learn_tasks

    torch.set_num_threads(1)
    model = small_model()
    config = dataclasses.replace(small_config(method), batch_size=batch_size, shift=0, flip=False)
    args = TrainingArguments(output_dir=out + ".trainer", max_grad_norm=0.0, report_to="none", disable_tqdm=True,
                             use_cpu=True, logging_strategy="no")
    result = learn_tasks(model, fonts_tasks(train_per_class=12), config, args=args)
    if PartialState().is_main_process:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump({"accuracy_matrix": result["accuracy_matrix"], "losses": result["losses"],
                       "processes": PartialState().num_processes}, f)


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--distributed":
        distributed_run(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    torch.set_num_threads(1)
    results = {f"{m}/{s}": run(m, s) for m, s in RUNS}
    with open(FIXTURE, "w") as f:
        json.dump({"torch": torch.__version__, "threads": 1, "runs": results}, f, indent=1)
    print(json.dumps(results, indent=1))
