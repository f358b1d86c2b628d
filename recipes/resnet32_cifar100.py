"""ResNet-32 from scratch on CIFAR-100, 5 equal tasks of 20 classes, with the settings of the reference's
ResNet scripts (the paper's ResNet path). Not run here (no GPU, no network), so no Table 1 number is claimed.

    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        recipes/resnet32_cifar100.py --output_dir runs/resnet32-cifar100-pmi

Other splits: ``--num_tasks 10`` or ``--num_tasks 20`` (replay budget and l_ft follow the reference's
scripts for each); baselines: ``--method finetune | lwf | full_inversion | exemplar_replay``. Defaults and
their sources (the reference's ``task_cont_cifar100_*_task.sh``, method.md): `hf_pmi.resnet.recipe`.
Data: ``uoft-cs/cifar100`` (columns img / fine_label), normalised with CIFAR-100's per-channel mean and
std; offline, any image folder works: ``--data_dir path/to/images`` (<class>/ folders under train/ and test/).
A rerun with the same ``--output_dir`` resumes after the last finished task. Flags take Trainer's names
(``--learning_rate``, ``--per_device_train_batch_size``, ``--gradient_accumulation_steps``, ``--report_to``);
``--max_grad_norm`` defaults to 0 (the reference never clips; Trainer's own default is 1.0).

The reference's readings are the defaults, including four that hf_pmi's library defaults do not share
(``--loss_form product``, ``--target_classes random``, ``--crop_fill black``, ``--head_counts running``;
docs/resnet.md, "Remaining deviations", has each one's measured effect). Assumed where the reference is not
readable: the augmentation (CIFAR practice) and ``--last_stage block``.
Settings kept as flags, off by default: ``--schedule one_cycle``, ``--regenerate false``, ``--selection gaussian``.
"""

from hf_pmi.resnet.recipe import parse_args, run

# uoft-cs/cifar100's columns; 32 px images; 5 tasks (the paper: 5 / 10 / 20)
DEFAULTS = {"dataset_name": "uoft-cs/cifar100", "image_column": "img", "label_column": "fine_label", "image_size": 32,
            "num_tasks": 5}


def main(argv=None):
    return run(*parse_args(argv, DEFAULTS))


if __name__ == "__main__":
    main()
