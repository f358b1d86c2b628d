"""Truthful cards and a `clip/` that meets the ecosystem: the card states the right task count, the prompt
template, the licence it knows (else says it does not), no raw enum, distinct tags, and a usage snippet that
runs as written; `pipeline("zero-shot-image-classification", model=".../clip")` predicts as the model does."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hub_server import hub_client, hub_server  # noqa: F401  (fixtures)
from peft import LoraConfig
from transformers import SchedulerType

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.model_card import BASE_TAGS, render_model_card
from hf_pmi.testing import build_clip

TEMPLATE = "a photo of the digit {}."
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's hf_pmi for subprocesses


def train(out, digits, processor, base=None, method="finetune", **kw):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    model = ContinualCLIP.from_clip(base or build_clip("tiny"), templates=[TEMPLATE], lora=LoraConfig(r=2))
    args = ContinualConfig(output_dir=str(out), method=method, max_steps=3, per_device_train_batch_size=16,
                           warmup_steps=0, disable_tqdm=True, logging_steps=100, seed=0, **kw)
    ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=processor).train()
    return out / "task-1", tasks


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, digits, processor):
    return train(tmp_path_factory.mktemp("cards") / "run", digits, processor)


def python_blocks(card: str, section: str) -> list[str]:
    """The ```python blocks of the card's section `section` (up to the next heading)."""
    body = re.split(r"\n#{2,3} ", card.split(f"## {section}\n", 1)[1])[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_the_card_states_the_task_count_it_has():
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
    card = render_model_card({"accuracy_matrix": [[0.9], [0.8, 0.7], [0.6, 0.5, 0.4]], "num_tasks": 6, "task_id": 2,
                              "class_names": names, "class_order": list(range(12))})
    done, total, seen = re.search(r"\((\d+) of (\S+) tasks,\s+(\S+) classes seen\)", card).groups()
    assert (done, total, seen) == ("3", "6", "6")
    assert "| 5 | – | – | – | – | – | – |" not in card and "| After task | Task 0 |" in card


def test_no_raw_enum_no_empty_cell_and_the_prompt_template():
    card = render_model_card({"accuracy_matrix": [[0.9]], "num_tasks": 1, "task_id": 0, "templates": [TEMPLATE],
                              "hyperparameters": {"lr_scheduler_type": SchedulerType.COSINE, "seed": 0},
                              "inversion": {"preset": "", "layer_steps": 10}})
    assert "SchedulerType" not in card and "| lr_scheduler_type | cosine |" in card
    assert "| preset | – |" in card and not re.search(r"\|[ \t]*\|", card)
    assert f"`{TEMPLATE}`" in card and f'hypothesis_template="{TEMPLATE}"' in card
    assert "revision=" not in card  # a local folder has no revision


def test_a_local_run_card_is_truthful_and_its_snippet_runs_as_written(local_run, digits, tmp_path):
    from huggingface_hub import ModelCard

    task, tasks = local_run
    card = ModelCard.load(task / "README.md")
    assert card.data.license == "other" and "License:** not determined" in card.text  # no Hub id: unknown licence
    assert card.data.base_model is None  # a CLIP built from a config has no Hub id
    assert card.data.tags == BASE_TAGS + ["finetune", "data-free", "lora", "peft"]  # each once, no near-duplicate
    assert "model-inversion" not in card.data.tags and "rehearsed on samples obtained by" not in card.text
    assert re.search(r"\(2 of 2 tasks,\s+10 classes seen\)", card.text)
    image = tmp_path / "digit.png"
    digits["test"][0]["image"].save(image)
    blocks = python_blocks(card.text, "How to use")
    assert len(blocks) == 2 and "FeatureBank" not in blocks[0]  # finetune keeps no bank: no line that fails
    script = "\n".join(blocks).replace('"path/to/task-1"', repr(str(task))).replace('"path/to/image.png"',
                                                                                 repr(str(image)))
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'label':" in out.stdout
    compile(python_blocks(card.text, "How to use")[-1], "card", "exec")
    continued = card.text.split("### Continue training on new classes", 1)[1]
    compile(re.search(r"```python\n(.*?)```", continued, re.S).group(1), "card", "exec")  # valid Python


def test_pipeline_on_clip_folder_predicts_as_the_model(local_run, digits):
    from transformers import pipeline

    task, tasks = local_run
    model = ContinualCLIP.from_pretrained(task).eval()
    classifier = pipeline("zero-shot-image-classification", model=f"{task}/clip")
    images = [row["image"] for row in tasks.seen_test(1).select(range(12))]
    pixels = classifier.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = model(pixel_values=pixels).logits.softmax(-1)
    for image, p in zip(images, probs):
        ranked = classifier(image, candidate_labels=model.class_names, hypothesis_template=TEMPLATE)
        assert ranked[0]["label"] == model.class_names[int(p.argmax())]
        by_label = {r["label"]: r["score"] for r in ranked}
        assert torch.allclose(torch.tensor([by_label[n] for n in model.class_names]), p, atol=1e-4)


def test_a_hub_run_card_names_the_base_licence_and_its_snippet_runs_from_the_hub(hub_client, tmp_path, digits,
                                                                                 processor):
    from huggingface_hub import HfApi, ModelCard

    api = HfApi()
    build_clip("tiny").save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "README.md").write_text("---\nlicense: mit\n---\n\nA tiny CLIP.\n")
    api.create_repo("tester/tiny-clip-mit")
    api.upload_folder(repo_id="tester/tiny-clip-mit", folder_path=tmp_path / "base")
    repo = "tester/continual-card"
    task, _ = train(tmp_path / "run", digits, processor, base=ContinualCLIP.from_clip("tester/tiny-clip-mit").clip,
                    push_to_hub=True, hub_model_id=repo)
    card = ModelCard.load(repo)
    card.validate()
    assert card.data.license == "mit" and "`mit` (the base model's)" in card.text
    assert card.data.base_model == "tester/tiny-clip-mit"
    image = tmp_path / "digit.png"
    digits["test"][0]["image"].save(image)
    script = "\n".join(python_blocks(card.text, "How to use")).replace('"path/to/image.png"', repr(str(image)))
    assert 'revision="task-1"' in script
    env = {**hub_client.client_env(home=str(tmp_path / "fresh_home")), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'label':" in out.stdout
