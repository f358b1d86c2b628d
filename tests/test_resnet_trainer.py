"""`ContinualTrainer` given an image classifier with BatchNorm (`hf_pmi.resnet.runner`): datasets in, per-task
folders that serve `pipeline`, resume, continuing data-free from a local or Hub task, and refusals before work."""

import json
import os
import shutil

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from hub_server import TEST_TOKEN, hub_client, hub_server  # noqa: F401  (fixtures)
from PIL import Image
from transformers import TrainerCallback, pipeline

from hf_pmi import ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.resnet import BNInversionConfig, ResNet32Config, ResNet32ForImageClassification
from hf_pmi.resnet.continual import ResNetContinualConfig
from hf_pmi.resnet.data import tensor_tasks

SIZE = 8
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 230), "yellow": (230, 220, 20),
           "cyan": (20, 210, 220), "magenta": (210, 30, 200)}


def colours(names, n_train=12, n_test=4, seed=0):
    """One class per colour: the colour plus pixel noise, `SIZE` px."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        images, labels = [], []
        for k, name in enumerate(names):
            for _ in range(n):
                noise = torch.randint(-25, 26, (SIZE, SIZE, 3), generator=g)
                pixels = (torch.tensor(COLOURS[name]) + noise).clamp(0, 255).to(torch.uint8).numpy()
                images.append(Image.fromarray(pixels))
                labels.append(k)
        features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(names))})
        return Dataset.from_dict({"image": images, "label": labels}, features=features)

    return DatasetDict(train=split(n_train), test=split(n_test))


def tiny_resnet():
    torch.manual_seed(0)
    return ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=0, image_size=SIZE))


def schedule(**kw):
    base = dict(epochs=8, later_epochs=6, head_epochs=1, batch_size=8, replay_per_class=6, shift=0,
                inversion=BNInversionConfig(layer_steps=2, refine_steps=3, warmup=1))
    return ResNetContinualConfig(**{**base, **kw})


def args(out, method="pmi", **kw):
    kw = {"max_grad_norm": 0.0, **kw}  # the reference never clips (Trainer's default would clip at 1.0)
    return ContinualConfig(output_dir=str(out), method=method, seed=0, disable_tqdm=True, **kw)


class Events(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_task_begin(self, args, state, control, task_id, **kw):
        self.seen.append(("begin", task_id))

    def on_task_end(self, args, state, control, task_id, result, **kw):
        self.seen.append(("end", task_id, len(result.accuracy_matrix)))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_resnet_learns_task_by_task_and_its_folders_serve_the_pipeline(tmp_path):
    tasks = split_class_incremental(colours(["red", "green", "blue", "yellow"]), num_tasks=2, seed=None)
    events = Events()
    model = tiny_resnet()
    trainer = ContinualTrainer(model=model, args=args(tmp_path / "out"), tasks=tasks, processing_class=None,
                               method_config=schedule(), callbacks=[events])
    trainer.save_model(str(tmp_path / "before"))  # before any task: the model and its processor
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(tmp_path / "before"))
    result = trainer.train()
    assert "after task 1" in open(trainer.create_model_card()).read()
    assert events.seen == [("begin", 0), ("end", 0, 1), ("begin", 1), ("end", 1, 2)]
    assert result.accuracy_matrix[0][0] > 0.9  # chance 0.5
    assert [len(row) for row in result.accuracy_matrix] == [2, 2] and result.accuracy_matrix[0][1] is None
    with open(tmp_path / "out" / "results.json") as f:
        assert json.load(f)["accuracy_matrix"] == result.accuracy_matrix
    assert model.config.id2label == {0: "red", 1: "green", 2: "blue", 3: "yellow"}
    folder = str(tmp_path / "out" / "task-1")
    assert os.path.isfile(os.path.join(folder, "preprocessor_config.json"))
    # the task folder classifies raw images as the run evaluated them (same resizing, same normalisation)
    classify = pipeline("image-classification", model=folder, device="cpu")
    test = tasks.seen_test(1)
    model.eval()
    with torch.no_grad():
        x = torch.cat([t.x_test for t in tensor_tasks(tasks, SIZE, trainer.family_run.processor.image_mean,
                                                      trainer.family_run.processor.image_std, progress=False)])
        expected = [model.config.id2label[i] for i in model(pixel_values=x).logits.argmax(-1).tolist()]
    got = [out[0]["label"] for out in classify(list(test["image"]), top_k=1)]
    assert got == expected


def test_a_stopped_run_resumes_to_the_same_matrix_and_is_not_overwritten_by_accident(tmp_path):
    tasks = split_class_incremental(colours(["red", "green", "blue", "yellow"]), num_tasks=2, seed=None)
    whole = ContinualTrainer(model=tiny_resnet(), args=args(tmp_path / "out"), tasks=tasks, processing_class=None,
                             method_config=schedule()).train()
    shutil.rmtree(tmp_path / "out" / "task-1")  # as if stopped during task 1
    with pytest.raises(ValueError, match="resume_from_checkpoint=True"):
        ContinualTrainer(model=tiny_resnet(), args=args(tmp_path / "out"), tasks=tasks, processing_class=None,
                         method_config=schedule()).train()
    resumed = ContinualTrainer(model=tiny_resnet(), args=args(tmp_path / "out", resume_from_checkpoint="true"),
                               tasks=tasks, processing_class=None, method_config=schedule()).train()
    assert resumed.accuracy_matrix == whole.accuracy_matrix  # bit-equal: the same training to the last step


def test_a_pushed_task_is_continued_from_the_hub_without_old_images(tmp_path, hub_client):  # noqa: F811
    from huggingface_hub import HfApi

    first = split_class_incremental(colours(["red", "green", "blue", "yellow"]), num_tasks=2, seed=None)
    method = "exemplar_replay"  # its pool holds real images: forgetting depends only on the pool being used
    ContinualTrainer(model=tiny_resnet(), args=args(tmp_path / "a", method, push_to_hub=True,
                                                    hub_model_id="tester/r32", hub_token=TEST_TOKEN),
                     tasks=first, processing_class=None, method_config=schedule()).train()
    api = HfApi()
    assert {"main", "task-0", "task-1"} <= {b.name for b in api.list_repo_refs("tester/r32").branches}
    new = split_class_incremental(colours(["cyan", "magenta"], seed=1), num_tasks=1, seed=None)
    trainer = ContinualTrainer.from_pretrained("tester/r32", revision="task-1", tasks=new, args=args(tmp_path / "b", method))
    result = trainer.train()
    assert trainer.model.config.num_labels == 6 and trainer.model.config.id2label[5] == "magenta"
    assert result.accuracy_matrix == [[None, None, result.accuracy_matrix[0][2]]]  # old tasks have no data here
    assert [n for n in os.listdir(tmp_path / "b") if n.startswith("task-")] == ["task-2"]  # after the Hub run's tasks
    # old classes, never shown in this run, are still recognised (replayed from the checkpoint's pool),
    # unlike a continuation that replays nothing (finetune on the same checkpoint)
    plain = ContinualTrainer.from_pretrained("tester/r32", revision="task-1", tasks=new,  # every parameter trained
                                             args=args(tmp_path / "c", "finetune"), method_config=schedule(schedule="one_cycle"))
    plain.train()
    old = split_class_incremental(colours(["red", "green", "blue", "yellow"], seed=2), num_tasks=1, seed=None)
    proc = trainer.family_run.processor
    (old_t,) = tensor_tasks(old, SIZE, proc.image_mean, proc.image_std, progress=False)
    kept, lost = [old_class_accuracy(t.model, old_t) for t in (trainer, plain)]
    assert kept > 0.6 and lost < 0.3, (kept, lost)  # chance among 6 classes: 0.17
    with pytest.raises(ValueError, match="holds real images, which 'pmi' cannot replay"):
        ContinualTrainer.from_pretrained("tester/r32", revision="task-1", tasks=new,
                                         args=args(tmp_path / "d", "pmi")).train()


def old_class_accuracy(model, task):
    with torch.no_grad():
        return (model.eval()(pixel_values=task.x_test).logits.argmax(-1) == task.y_test).float().mean().item()


@pytest.mark.parametrize("change, error, match", [
    (dict(method="feature_replay"), ValueError, "not one of the BatchNorm family's"),
    (dict(num_train_epochs=2), ValueError, r"ResNetContinualConfig.*'num_train_epochs': 'epochs / later_epochs'"),
    (dict(lr_scheduler_type="constant"), ValueError, r"'lr_scheduler_type': 'schedule / stage_lrs'"),
])
def test_settings_the_loop_would_ignore_are_refused(tmp_path, change, error, match):
    tasks = split_class_incremental(colours(["red", "green"], n_train=2, n_test=1), num_tasks=1, seed=None)
    kw = {"method": change.pop("method", "pmi")}
    with pytest.raises(error, match=match):
        ContinualTrainer(model=tiny_resnet(), args=args(tmp_path / "o", **kw, **change), tasks=tasks,
                         processing_class=None)
    assert not (tmp_path / "o" / "task-0").exists()


def test_trainer_names_set_the_loop_and_a_clash_is_refused(tmp_path):
    """--learning_rate / --per_device_train_batch_size / --weight_decay (Trainer's names) set the BN loop's lr,
    batch_size and weight_decay; the same setting given differently in both places is refused."""
    tasks = split_class_incremental(colours(["red", "green"], n_train=2, n_test=1), num_tasks=1, seed=None)
    trainer = ContinualTrainer(model=tiny_resnet(), args=args(tmp_path / "o", learning_rate=0.3,
                                                              per_device_train_batch_size=4, weight_decay=0.01),
                               tasks=tasks, processing_class=None)
    config = trainer.family_run.config
    assert (config.lr, config.batch_size, config.weight_decay) == (0.3, 4, 0.01)
    with pytest.raises(ValueError, match=r"args.learning_rate=0.3 but method_config.lr=0.2.*--learning_rate"):
        ContinualTrainer(model=tiny_resnet(), args=args(tmp_path / "o", learning_rate=0.3), tasks=tasks,
                         processing_class=None, method_config=ResNetContinualConfig(lr=0.2))


def test_bad_models_are_refused_before_any_work(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    tasks = split_class_incremental(colours(["red", "green"], n_train=2, n_test=1), num_tasks=1, seed=None)
    no_bn = tiny_resnet()
    for name, module in list(no_bn.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, child_name, torch.nn.Identity())
    with pytest.raises(ValueError, match="no BatchNorm layer.*'finetune', 'lwf'"):
        ContinualTrainer(model=no_bn, args=args(tmp_path / "o"), tasks=tasks, processing_class=None)
    text = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                                    intermediate_size=8, vocab_size=30))
    with pytest.raises(TypeError, match="takes 'input_ids', not images"):
        ContinualTrainer(model=text, args=args(tmp_path / "o"), tasks=tasks, processing_class=None)
    with pytest.raises(TypeError, match="method_config=ResNetContinualConfig"):
        ContinualTrainer(model=tiny_resnet(), args=args(tmp_path / "o"), tasks=tasks, processing_class=None,
                         method_config=object())
    assert not (tmp_path / "o" / "task-0").exists()


def test_transformers_resnet_learns_through_the_trainer_with_its_processor_size(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessorPil

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=0)
    model = ResNetForImageClassification(config)
    tasks = split_class_incremental(colours(["red", "green", "blue", "yellow"]), num_tasks=2, seed=None)
    with pytest.raises(ValueError, match="no image_size.*AutoImageProcessor.from_pretrained"):
        ContinualTrainer(model=model, args=args(tmp_path / "o", "lwf"), tasks=tasks, processing_class=None)
    processor = ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    trainer = ContinualTrainer(model=model, args=args(tmp_path / "o", "pmi"), tasks=tasks, processing_class=processor,
                               method_config=schedule())
    result = trainer.train()
    assert model.config.num_labels == 4 and model.classifier[-1].out_features == 4
    assert result.accuracy_matrix[0][0] > 0.9  # chance 0.5
    state = json.loads((tmp_path / "o" / "task-1" / "continual_state.json").read_text())
    # the reference's pool: after task 1 every seen class is inverted anew (the first task's classes a second time)
    assert state["inverted_classes"] == {"0": 2, "1": 2, "2": 1, "3": 1}
    saved = json.loads((tmp_path / "o" / "task-1" / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 16, "width": 16} and saved["image_mean"] == [0.5] * 3
