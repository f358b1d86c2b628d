"""Is the names-only teacher right where the model is wrong? (docs/names_only.md, "the transfer, not the teacher")

    python benchmarks/names_only_teacher.py --classes all --seeds 0 1 2 --output benchmarks/results/names_only_teacher.json

Reads the task-3 checkpoints that `benchmarks/names_only.py` (same ``--classes``) left in its workdir and
scores, on the real test images of the new (task 4) and old (tasks 0-3) classes, over all names:

- ``adapted``: the task-3 model with the new names added (zero-shot);
- ``raw``: the raw (adapter-free) CLIP with its text prototypes;
- ``teacher_t1`` / ``teacher_t2``: the boundary distillation's target (`boundary_target`: old-vs-new
  from the raw CLIP, old-vs-old from the task-3 model) at temperature 1 / 2, used as a classifier;
- ``projected``: in the raw CLIP's feature space, the old classes' text prototypes and, for the new
  classes, the mean of their projected pseudo features (`project_name`, reference settings K 5,
  gamma 0.1, 200 samples), nearest by cosine; ``projected_cosine``: mean cosine between those means
  and the means of the new classes' real training features.

With the names-only checkpoints of the same workdir (``names_only/task-4``), routing (the
trained model with routing off for the old classes' split, `routed_probs`) with four class embeddings
for the new classes in the raw CLIP: ``routed_text`` (their text prototypes), ``routed_projected``
(the projected means above), ``routed_gap_corrected`` (those through `text_space_prototypes`, the
default) and ``routed_image_means`` (every class by its mean raw image feature: old classes from
the bank's raw Gaussians); ``seconds_routed`` / ``seconds_plain``: one forward of that model on a
batch of 128 test images with its routing on / off (the mean of 3 after a warm-up).

``modality_gap_cosine``: mean cosine between an old class's mean raw image feature and its text
prototype (near 1: no gap between the raw CLIP's image and text features).

``oracle_raw`` / ``oracle_routed`` / ``oracle_product``: the raw CLIP, routing and the product with the
task-3 model, the new classes embedded as the default embeds them but from the mean raw feature of their
*real* training images (a perfect projection; no names-only method has these images): a ceiling of what
any class-embedding-based scoring can gain.

A teacher that beats ``adapted`` bounds what distilling it could gain; the names-only training only
sees inverted maps, so the gap between this and ``unrouted_names_only_new`` (names_only.py: the
trained model alone) is the loss in the transfer. Routing uses the teacher itself at inference.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_seed(seed, workdir, classes):
    import torch
    import torch.nn.functional as F
    from datasets import concatenate_datasets

    from hf_pmi import ContinualCLIP
    from hf_pmi.bank import FeatureBank
    from hf_pmi.blocks import VisionBlocks, unwrap_clip
    from hf_pmi.data import ContinualCollator
    from hf_pmi.names_only import (boundary_target, project_name, raw_clip, raw_text_prototypes,
                                   text_space_prototypes)
    from hf_pmi.routing import product_probs, routed_probs
    from hf_pmi.testing import build_processor

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from names_only import protocol_tasks

    checkpoint = os.path.join(workdir, f"seed{seed}", "base", "task-3")
    if not os.path.isdir(checkpoint):
        raise SystemExit(f"No {checkpoint}: run `python benchmarks/names_only.py --classes {classes} --seeds {seed} "
                         f"--workdir {workdir}` first.")
    processor = build_processor()
    tasks = protocol_tasks(classes, seed)  # names_only.py's defaults
    collate = ContinualCollator(processor.image_processor, tasks.label_map)
    model = ContinualCLIP.from_pretrained(checkpoint).eval()
    bank = FeatureBank.from_pretrained(os.path.join(checkpoint, "feature_bank"))
    n_old = len(model.class_names)
    new_ids, new_mask = model.tokenize_classes(tasks[4].class_names, processor.tokenizer)
    with torch.no_grad(), raw_clip(model) as clip:
        old_text = raw_text_prototypes(clip, model.prompt_ids, model.prompt_mask)
        new_text = raw_text_prototypes(clip, new_ids, new_mask)
        scale = unwrap_clip(clip).logit_scale.exp()
    text = torch.cat([old_text, new_text])
    generator = torch.Generator().manual_seed(seed)
    projected = torch.stack([
        project_name(bank.raw_means[:n_old], bank.raw_stds[:n_old], old_text, b, 5, 200, 0.1, generator).mean(0)
        for b in new_text
    ])

    def batch(dataset):
        b = collate([dataset[i] for i in range(len(dataset))])
        with torch.no_grad(), raw_clip(model) as clip:
            raw = VisionBlocks(clip).features(b["pixel_values"]).float()
        return b["pixel_values"], b["labels"], raw

    _, new_labels, new_raw = batch(tasks[4].train)
    real_means = torch.stack([F.normalize(new_raw[new_labels == c], dim=-1).mean(0)
                              for c in range(n_old, n_old + len(new_text))])
    result = {"seed": seed, "projected_cosine": F.cosine_similarity(projected, real_means).mean().item(),
              "modality_gap_cosine": F.cosine_similarity(bank.raw_means[:n_old], old_text).mean().item()}
    model.add_classes(tasks[4].class_names, processor.tokenizer)  # the zero-shot model over all names
    projected_classifier = torch.cat([old_text, F.normalize(projected, dim=-1)])
    # a perfect projection: the new classes' class embeddings from the mean raw feature of their real training
    # images, built as the default's (modality gap taken off) -- not available to names-only learning
    oracle_classifier = torch.cat([old_text, text_space_prototypes(real_means, bank.raw_means[:n_old], old_text)])
    routed_checkpoint = os.path.join(workdir, f"seed{seed}", "names_only", "task-4")
    trained, embeddings = None, {}
    if os.path.isdir(routed_checkpoint):
        trained = ContinualCLIP.from_pretrained(routed_checkpoint).eval()
        embeddings = {
            "routed_text": text,
            "routed_projected": projected_classifier,
            "routed_gap_corrected": torch.cat([old_text, text_space_prototypes(projected, bank.raw_means[:n_old],
                                                                               old_text)]),
            "routed_image_means": torch.cat([F.normalize(bank.raw_means[:n_old], dim=-1),
                                             projected_classifier[n_old:]]),
        }
    routed = torch.arange(len(text)) >= n_old
    for part, dataset in (("new", tasks[4].test), ("old", concatenate_datasets([t.test for t in tasks.tasks[:4]]))):
        pixels, labels, raw = batch(dataset)
        with torch.no_grad():
            adapted = model(pixel_values=pixels).logits.float()  # its first n_old columns: the task-3 model's
        old_logits = adapted[:, :n_old]
        raw_logits = scale * F.normalize(raw, dim=-1) @ text.t()
        scores = {
            "adapted": adapted,
            "raw": raw_logits,
            "teacher_t1": boundary_target(raw_logits, old_logits, n_old),
            "teacher_t2": boundary_target(raw_logits / 2, old_logits / 2, n_old),
            "projected": F.normalize(raw, dim=-1) @ projected_classifier.t(),
            "oracle_raw": F.normalize(raw, dim=-1) @ oracle_classifier.t(),
            "oracle_routed": routed_probs(scale * F.normalize(raw, dim=-1) @ oracle_classifier.t(), adapted,
                                          torch.arange(len(text)) >= n_old),
            "oracle_product": product_probs(scale * F.normalize(raw, dim=-1) @ oracle_classifier.t(), adapted),
        }
        if trained is not None:
            with torch.no_grad():
                trained_logits = trained(pixel_values=pixels).logits.float()  # the model alone, not routed
            for name, classifier in embeddings.items():
                scores[name] = routed_probs(scale * F.normalize(raw, dim=-1) @ classifier.t(), trained_logits, routed)
        for name, s in scores.items():
            result[f"{name}_{part}"] = s.argmax(-1).eq(labels).float().mean().item()
    if trained is not None:
        result.update(time_routing(trained, pixels[:128]))
    return result


def time_routing(model, pixels, repeats=3):
    """Seconds per forward of `pixels` with the model's router, and without it (after one warm-up each)."""
    import copy
    import time

    import torch

    from hf_pmi.routing import ClassRouter

    plain = copy.deepcopy(model)
    plain.router = ClassRouter(model.router.prototypes.shape[1])  # no routed class: the adapted model alone
    timings = {}
    for name, m in (("seconds_routed", model), ("seconds_plain", plain)):
        with torch.no_grad():
            m(pixel_values=pixels)
            start = time.perf_counter()
            for _ in range(repeats):
                m(pixel_values=pixels)
        timings[name] = (time.perf_counter() - start) / repeats
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--classes", choices=["all", "held_out"], default="all")
    parser.add_argument("--workdir", default=None, help="Default: runs/names_only_<classes> (names_only.py's).")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "names_only_teacher.json"))
    a = parser.parse_args()
    a.workdir = a.workdir or os.path.join(ROOT, "runs", f"names_only_{a.classes}")
    seeds = []
    for seed in a.seeds:
        seeds.append(run_seed(seed, a.workdir, a.classes))
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in seeds[-1].items()),
              flush=True)
    report = {"seeds": seeds, "command": " ".join([os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]])}
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"-> {a.output}")


if __name__ == "__main__":
    main()
