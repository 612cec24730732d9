"""Test-time adaptation of a WEMoE model (WEMoE, Tang et al. 2024): only the routers train, minimising the sum over
tasks of the mean entropy of the zero-shot predictions on unlabeled images, one shuffled batch of every task per step.

    accelerate launch examples/we_moe/tta_wemoe.py --model wemoe-b32 \
        --tasks data/sun397 data/cars data/resisc45 data/eurosat data/svhn data/gtsrb data/mnist data/dtd \
        --output_dir wemoe-b32-tta --save_steps 100 --bf16

The paper's values are the defaults (Adam lr 1e-4 as adamw_torch with weight decay 0, 1000 steps with the original
repo's cosine annealing, 16 images per task per step, no clipping): `--help` lists them. Each TASK_DIR is a class-folder
image set (labels unused; class names from the folders or `--class_names`, templates via `--templates`, as
`hf-moe eval zero-shot`). Same as `hf-moe tta-wemoe ...`; runs under plain `python` too. Re-running continues the same
job from its last complete checkpoint, reports a finished one as done, and refuses one whose options, model or data
changed. `--push_to_hub --hub_model_id` pushes the final folder with its model card.
"""

from hf_moe.we_moe.tta import main


if __name__ == "__main__":
    main()
