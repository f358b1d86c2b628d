import math

import pytest
import torch

from configs import FAST_INVERSION, fast_exemplars, fast_pmi

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.inversion import passes_per_chunk
from hf_pmi.methods import METHODS, ContinualMethod, register_method
from hf_pmi.methods.pmi import FullInversion
from hf_pmi.modeling import ContinualCLIPOutput
from hf_pmi.replay import replay_losses, task_weights
from hf_pmi.testing import build_clip


def test_task_weights_follow_r_dfcil():
    w = task_weights(n_old=20, n_new=20, l_ce=1.0, l_hkd=0.1, l_tkd=0.2)
    alpha, beta = math.log2(11), 1.0
    assert w["ce"] == pytest.approx((1 + 1 / alpha) / beta)
    assert w["hkd"] == pytest.approx(0.1 * alpha * beta) and w["tkd"] == pytest.approx(0.2 * alpha * beta)
    with pytest.raises(ValueError, match="n_old=0"):
        task_weights(0, 2, 1, 1, 1)


def test_replay_losses_definitions_and_gradient_paths():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    rep = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    s = torch.tensor(10.0)
    out = ContinualCLIPOutput(logits=s * img @ text.t(), replay_logits=s * rep @ text.t(), image_embeds=img,
                              replay_image_embeds=rep, text_embeds=text, logit_scale=s)
    t_text = text.detach() + 0.1
    teacher = ContinualCLIPOutput(replay_logits=(s * rep @ t_text.t()).detach(), text_embeds=t_text)
    labels, replay_labels = torch.tensor([3, 4, 3, 4]), torch.tensor([0, 1, 2])
    w = {"ce": 2.0, "hkd": 0.5, "tkd": 0.25}
    terms = replay_losses(out, teacher, labels, replay_labels, n_old=3, weights=w, l_ft=0.1)
    expected_ce = torch.nn.functional.cross_entropy(out.logits[:, 3:], labels - 3)
    assert terms["ce"].item() == pytest.approx(2.0 * expected_ce.item())
    assert terms["tkd"].item() == pytest.approx(0.25 * 0.1, rel=1e-5)  # |T_old - (T_old + 0.1)| = 0.1 everywhere
    # the balancing CE only trains the text side: no gradient reaches the image features
    terms["ft"].backward()
    assert img.grad is None and rep.grad is None and text.grad is not None


def _args(tmp_path, method, **kw):
    base = dict(output_dir=str(tmp_path / method), method=method, max_steps=3, per_device_train_batch_size=16,
                warmup_steps=0, disable_tqdm=True, logging_steps=100)
    return ContinualConfig(**{**base, **kw})


def test_pmi_between_tasks_fills_bank_buffer_and_grid_and_leaves_no_hooks(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    model = ContinualCLIP.from_clip(build_clip("tiny"))
    trainer = ContinualTrainer(model=model, args=_args(tmp_path, "pmi"), tasks=tasks, processing_class=processor,
                               method_config=fast_pmi(selection="cfs", grid_samples=8))
    result = trainer.train()
    method = trainer.method
    assert method.bank.num_classes == 10 and len(method.bank.contrastive) == 10
    samples, labels = method.buffer
    assert samples.shape == (20, 32, 8, 8) and labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert all(log["inversion_full_model_passes"] > 0 for log in result.method_logs)
    assert (tmp_path / "pmi" / "task-1" / "replay_samples.png").exists()
    assert (tmp_path / "pmi" / "task-1" / "feature_bank" / "feature_bank.safetensors").exists()
    for module in trainer.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_full_inversion_gets_the_pmi_budget(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    model = ContinualCLIP.from_clip(build_clip("tiny"))
    trainer = ContinualTrainer(model=model, args=_args(tmp_path, "full_inversion"), tasks=tasks,
                               processing_class=processor, method_config=fast_pmi())
    assert isinstance(trainer.method, FullInversion) and trainer.method.mode == "full"
    assert trainer.method.inversion.full_steps == round(passes_per_chunk(model.blocks, FAST_INVERSION))
    assert trainer.method.inversion.seed == trainer.args.seed  # an unset seed is the run's
    explicit = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=_args(tmp_path, "full_inversion"),
                                tasks=tasks, processing_class=processor, method_config=fast_pmi(full_steps=5, seed=9))
    assert (explicit.method.inversion.full_steps, explicit.method.inversion.seed) == (5, 9)  # explicit values are kept


def test_a_method_refuses_another_methods_config(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    with pytest.raises(TypeError, match="takes a LwFConfig, got PMIConfig"):
        ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=_args(tmp_path, "lwf"), tasks=tasks,
                         processing_class=processor, method_config=fast_pmi())


@pytest.mark.parametrize("method", ["lwf", "feature_replay", "joint", "zero_shot"])
def test_baselines_run_in_the_same_loop(tmp_path, digits, processor, method):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=_args(tmp_path, method),
                               tasks=tasks, processing_class=processor)
    result = trainer.train()
    assert len(result.accuracy_matrix) == 2 and result.accuracy_matrix[1][0] is not None
    if method == "feature_replay":
        assert trainer.method.bank.num_classes == 10


def test_a_registered_method_is_used_by_name(tmp_path, digits, processor):
    calls = []

    @register_method("test_counting")
    class Counting(ContinualMethod):
        def after_task(self, task_id):
            calls.append(task_id)
            return {"counted": task_id}

    try:
        tasks = split_class_incremental(digits, num_tasks=2, seed=0)
        result = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")),
                                  args=_args(tmp_path, "test_counting"), tasks=tasks,
                                  processing_class=processor).train()
        assert calls == [0, 1] and result.method_logs == [{"counted": 0}, {"counted": 1}]
    finally:
        METHODS.pop("test_counting")


def test_exemplar_replay_keeps_real_patch_maps_and_reloads_them_exactly(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    model = ContinualCLIP.from_clip(build_clip("tiny"))
    trainer = ContinualTrainer(model=model, args=_args(tmp_path, "exemplar_replay"), tasks=tasks,
                               processing_class=processor, method_config=fast_exemplars(per_class=3))
    trainer.train()
    method = trainer.method
    samples, labels = method.buffer
    assert not method.data_free
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    # the first three training images of task 0's first class, through the (frozen) patch embedding
    first = tasks[0].class_ids[0]
    rows = [r for r in tasks[0].train if tasks.label_map[r["label"]] == first][:3]
    pixels = trainer.data_collator(rows)["pixel_values"]
    with torch.no_grad():
        expected = model.blocks.patch_embed(pixels)
    torch.testing.assert_close(samples[:3], expected)
    method.buffer = None
    method.load(str(tmp_path / "exemplar_replay" / "task-1"))
    assert torch.equal(method.buffer[0], samples) and torch.equal(method.buffer[1], labels)
