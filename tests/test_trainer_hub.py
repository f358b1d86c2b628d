"""Trainer.save_model / push_to_hub / create_model_card do the continual thing; ContinualCLIP.push_to_hub;
the card's metadata is truthful and passes the (local) Hub's checks. Real HTTP against tests/hub_server.py."""

import json

import pytest
import torch
from hub_server import TEST_TOKEN, hub_client, hub_server  # noqa: F401  (fixtures)
from peft import LoraConfig

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.testing import build_clip

REPO = "tester/continual-lora"
BASE = "tester/tiny-clip"


def test_trainer_save_push_and_card_with_a_lora_on_a_hub_base(tmp_path, hub_client, digits, processor):
    from huggingface_hub import HfApi, ModelCard

    build_clip("tiny").save_pretrained(tmp_path / "base")
    HfApi().create_repo(BASE)
    HfApi().upload_folder(repo_id=BASE, folder_path=tmp_path / "base")
    lora = LoraConfig(r=4, modules_to_save=["text_projection"])
    model = ContinualCLIP.from_clip(BASE, lora=lora)  # downloaded from the local Hub: the base has a Hub id
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    tasks.metadata["dataset"] = "imagefolder"  # what a local image folder records: not a dataset id
    args = ContinualConfig(output_dir=str(tmp_path / "run"), method="finetune", max_steps=2, per_device_train_batch_size=16,
                           disable_tqdm=True, hub_model_id=REPO, seed=0)
    trainer = ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=processor)
    with pytest.raises(ValueError, match="train"):
        trainer.push_to_hub()  # nothing finished yet: says what to do
    trainer.train()

    trainer.save_model()  # the latest task's checkpoint, at the root of output_dir
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        saved = ContinualCLIP.from_pretrained(tmp_path / "run").eval()(pixel_values=x).logits
        latest = ContinualCLIP.from_pretrained(tmp_path / "run" / "task-1").eval()(pixel_values=x).logits
    assert torch.equal(saved, latest)
    assert not (tmp_path / "run" / "base").exists()  # a Hub base is not copied into the checkpoint

    result = trainer.push_to_hub()
    assert result.ok and result.branch == "task-1", result.error
    repo = hub_client.repos[REPO]
    assert repo.files("main") == repo.files("task-1")
    assert {"clip/model.safetensors", "adapter/adapter_model.safetensors", "README.md"} <= set(repo.files("main"))

    # the card, read back from the server, and checked by the server's metadata rules
    card = ModelCard.load(REPO)
    card.validate()
    data = card.data
    assert data.library_name == "hf_pmi" and data.base_model == BASE
    assert data.to_dict()["base_model_relation"] == "adapter"
    assert data.datasets is None  # not "imagefolder"
    assert "lora" in data.tags and "peft" in data.tags
    text = card.text
    order = ", ".join(map(str, tasks.class_order))
    assert f"`{order}`" in text and tasks.class_order != sorted(tasks.class_order)  # the real class order
    assert "| learning_rate | 0.001 |" in text and "| max_steps | 2 |" in text
    assert "- transformers " in text and "- peft " in text and "- torch " in text
    adapter_card = ModelCard(repo.files("main")["adapter/README.md"].decode())
    assert adapter_card.data.library_name == "peft" and adapter_card.data.base_model == BASE

    readme = trainer.create_model_card(license="mit", tags=["digits"], dataset="me/digits")
    card = ModelCard.load(readme)
    assert card.data.license == "mit" and "digits" in card.data.tags and card.data.datasets == ["me/digits"]
    card.validate()


def test_continual_clip_push_to_hub_is_symmetric_with_from_pretrained(tmp_path, hub_client, processor):
    from huggingface_hub import HfApi

    model = ContinualCLIP.from_clip(build_clip("tiny", seed=3), ["cat", "dog"], processor.tokenizer).eval()
    info = model.push_to_hub("tester/plain", revision="v1", token=TEST_TOKEN)  # branch created from main
    assert info.oid == hub_client.repos["tester/plain"].branches["v1"]
    assert "continual_clip.json" not in HfApi().list_repo_files("tester/plain")  # main untouched
    reloaded = ContinualCLIP.from_pretrained("tester/plain", revision="v1", token=TEST_TOKEN,
                                             cache_dir=str(tmp_path / "cache")).eval()
    assert list((tmp_path / "cache").iterdir())  # downloaded into the given cache
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=x).logits, model(pixel_values=x).logits)
    assert reloaded.class_names == ["cat", "dog"]


def test_save_model_before_training_writes_a_loadable_model(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    args = ContinualConfig(output_dir=str(tmp_path / "run"), method="finetune", max_steps=1, disable_tqdm=True)
    model = ContinualCLIP.from_clip(build_clip("tiny"), ["a", "b"], processor.tokenizer)
    trainer = ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=processor)
    trainer.save_model(str(tmp_path / "early"))
    assert ContinualCLIP.from_pretrained(tmp_path / "early").class_names == ["a", "b"]
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(tmp_path / "early").tokenizer is not None
    with pytest.raises(ValueError, match="No finished task"):
        trainer.create_model_card()


def test_continuing_keeps_the_checkpoint_method_unless_another_is_named(tmp_path, digits, processor, caplog):
    import dataclasses
    import logging

    tasks = split_class_incremental(digits, num_tasks=5, seed=0)
    old = dataclasses.replace(tasks, tasks=tasks.tasks[:1], class_order=tasks.class_order[:2],
                              class_names=tasks.class_names[:2])
    new = dataclasses.replace(tasks, tasks=[dataclasses.replace(tasks[1], task_id=0, class_ids=[0, 1])],
                              class_order=tasks.class_order[2:4], class_names=tasks.class_names[2:4])
    common = dict(max_steps=1, per_device_train_batch_size=16, disable_tqdm=True)
    ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), tasks=old, processing_class=processor,
                     args=ContinualConfig(output_dir=str(tmp_path / "a"), method="lwf", **common)).train()
    checkpoint = str(tmp_path / "a" / "task-0")

    kept = ContinualTrainer.from_pretrained(checkpoint, tasks=new, args=ContinualConfig(
        output_dir=str(tmp_path / "b"), **common))
    assert kept.args.method == "lwf"
    from hf_pmi.methods import METHODS

    assert isinstance(kept.method, METHODS["lwf"])
    with caplog.at_level(logging.WARNING, logger="hf_pmi"):
        other = ContinualTrainer.from_pretrained(checkpoint, tasks=new, args=ContinualConfig(
            output_dir=str(tmp_path / "c"), method="finetune", **common))
    assert other.args.method == "finetune" and "trained with method 'lwf'" in caplog.text
    result = kept.train()
    assert len(result.accuracy_matrix) == 2
    state = json.loads((tmp_path / "b" / "task-1" / "continual_state.json").read_text())
    assert state["method"] == "lwf" and state["task_id"] == 1


def test_a_lora_model_on_a_local_base_pushed_to_the_hub_loads_anywhere(tmp_path, hub_client, processor):
    """The local base travels in base/: the pushed checkpoint loads after the base folder is gone."""
    source = tmp_path / "local_base"
    build_clip("tiny", seed=4).save_pretrained(source)
    model = ContinualCLIP.from_clip(str(source), ["cat", "dog"], processor.tokenizer, lora=LoraConfig(r=2)).eval()
    model.push_to_hub("tester/local-base", processor=processor)
    source.rename(tmp_path / "gone")
    reloaded = ContinualCLIP.from_pretrained("tester/local-base", cache_dir=str(tmp_path / "cache")).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=x).logits, model(pixel_values=x).logits)
    files = hub_client.repos["tester/local-base"].files("main")
    assert "base/model.safetensors" in files and "clip/tokenizer.json" in files  # pipeline-ready clip/
    assert b"local_base" not in files["adapter/adapter_config.json"] + files["continual_clip.json"]
