"""CLIP ViT-B/16 on CUB-200, 10 tasks x 20 classes, the reference setup of the PMI paper.

    accelerate launch recipes/clip_cub200.py --output_dir runs/cub200-pmi
    accelerate launch recipes/clip_cub200.py --output_dir runs/cub200-pmi --push_to_hub --hub_model_id me/clip-cub200-pmi

Every default can be overridden; with a local model folder and a local image folder
(``<data_dir>/{train,test}/<class name>/*.png``) it runs offline:

    python recipes/clip_cub200.py --model_name_or_path path/to/clip --data_dir path/to/images --output_dir out

The default dataset id is a community upload of CUB-200-2011 with ``image`` / ``label`` columns and
``train`` / ``test`` splits; point ``--dataset_name`` at any dataset with the same shape.
"""

from hf_pmi.recipe import parse_run_args, run_recipe

# CUB values of the reference (method.md): 10 epochs, l_tkd 0.1, l_ft 0.1, alpha_rf 0.2 (so the per-layer
# weight a_layer = 0.2 * 15 blocks = 3.0), refinement lr 0.02; 10 tasks x 20 classes, class order seed 1993.
DEFAULTS = dict(
    method="pmi", dataset_name="bentrevett/caltech-ucsd-birds-200-2011", num_tasks=10, num_train_epochs=10,
    replay_l_tkd=0.1, replay_l_ft=0.1, inversion_alpha_rf=0.2, inversion_a_layer=3.0, inversion_refine_lr=0.02,
)


def main(argv=None):
    recipe, args, method_config = parse_run_args(argv, defaults=DEFAULTS)
    return run_recipe(recipe, args, method_config)


if __name__ == "__main__":
    main()
