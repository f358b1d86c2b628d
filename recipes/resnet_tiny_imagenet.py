"""ResNet-32 from scratch on Tiny-ImageNet (200 classes, 64 px), 5 equal tasks of 40 classes: the paper's
ResNet path on its second dataset, with the settings of the reference's Tiny-ImageNet scripts. Not run here.

    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        recipes/resnet_tiny_imagenet.py --output_dir runs/resnet32-tiny-pmi

Other splits: ``--num_tasks 10`` or ``--num_tasks 20``. The ResNet-32 keeps its CIFAR 3x3 stride-1 stem
at 64 px (the reference builds the same ``resnet32`` for both datasets): that is fine, its feature maps
are 64 / 32 / 16 px per stage and global pooling takes the rest, at 4x the compute of 32 px. Data: ``zh-plus/tiny-imagenet`` (columns image / label, the 10 000
"valid" images as test data; some are greyscale and become RGB), normalised with ImageNet's mean and std.
Inversion refines 1000 targets at a time (the reference's Tiny-ImageNet ``gen_batch_size``); other
defaults and their sources: `hf_pmi.resnet.recipe`. Offline: ``--data_dir path/to/images --test_split test``.
Flags as `recipes/resnet32_cifar100.py`'s (Trainer's names; ``--max_grad_norm`` 0 by default: no clipping, as the
reference).
Defaults and readings of the reference: as `recipes/resnet32_cifar100.py`'s (docs/resnet.md, "Remaining
deviations"); the 4 px crop is CIFAR's, assumed for 64 px too, and the black padding uses ImageNet's moments.
"""

from hf_pmi.resnet.recipe import parse_args, run

# zh-plus/tiny-imagenet's columns and test split; 64 px; ImageNet's per-channel mean / std
DEFAULTS = {"dataset_name": "zh-plus/tiny-imagenet", "image_column": "image", "label_column": "label",
            "test_split": "valid", "image_size": 64, "num_tasks": 5, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "inversion_refine_batch": 1000,
            "reference_dataset": "tiny-imagenet"}  # its scripts: the last stage at lr 5e-3 for every split


def main(argv=None):
    return run(*parse_args(argv, DEFAULTS))


if __name__ == "__main__":
    main()
