"""CLIP ViT-B/16 on ImageNet-R, 10 tasks x 20 classes: the PMI paper's ImageNet-R setting.

    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        recipes/clip_imagenet_r.py --output_dir runs/imagenet-r-pmi

ImageNet-R (200 classes, 30k renditions) ships one split; as in LAMDA-PILOT, 20 % of every class
is held out for testing (``--test_size``, stratified, drawn with ``--seed``). The default dataset id
is a community upload with ``image`` / ``label`` columns; point ``--dataset_name`` (or
``--data_dir``, an image folder) at any copy with the same shape. Training settings are the
reference's (method.md, the `ContinualConfig` / `PMIConfig` defaults); splits and class order
as in ``recipes/clip_cifar100.py`` (``--initial_classes``, ``--classes_per_task``,
``--class_order_seed``, ``--class_order_file``).
"""

from hf_pmi.recipe import parse_run_args, run_recipe

# 200 classes in 10 equal tasks; the held-out 20 % replaces the missing test split
DEFAULTS = dict(method="pmi", dataset_name="axiong/imagenet-r", num_tasks=10, test_size=0.2)


def main(argv=None):
    recipe, args, method_config = parse_run_args(argv, defaults=DEFAULTS)
    return run_recipe(recipe, args, method_config)


if __name__ == "__main__":
    main()
