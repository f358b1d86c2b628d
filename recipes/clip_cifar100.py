"""CLIP ViT-B/16 on CIFAR-100, 10 tasks x 10 classes: the PMI paper's CIFAR-100 setting.

    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        recipes/clip_cifar100.py --output_dir runs/cifar100-pmi

Reference values (method.md): class order shuffled with seed 1993, AdamW lr 1e-3, weight decay 0,
cosine schedule with 30 warm-up steps, batch 64 real + 64 replayed, 3 epochs per task, l_ce 1,
l_hkd 0.1, l_tkd 0.2, l_ft 0.001, inversion as the defaults of `PMIConfig`. Other splits: ``--initial_classes 50 --classes_per_task 10`` (B50-inc10) or
``--num_tasks 20``; another class order: ``--class_order_seed 0`` or ``--class_order_file order.json``.
Offline, any local model folder and image folder work:
``--model_name_or_path path/to/clip --data_dir path/to/images``.
"""

from hf_pmi.recipe import parse_run_args, run_recipe

# uoft-cs/cifar100 names its columns img / fine_label; 100 classes in 10 equal tasks
DEFAULTS = dict(method="pmi", dataset_name="uoft-cs/cifar100", image_column="img", label_column="fine_label", num_tasks=10)


def main(argv=None):
    recipe, args, method_config = parse_run_args(argv, defaults=DEFAULTS)
    return run_recipe(recipe, args, method_config)


if __name__ == "__main__":
    main()
