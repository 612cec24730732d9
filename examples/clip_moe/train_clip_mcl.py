"""MCL expert extraction + CLIP-MoE construction (CLIP-MoE, stage 1 of 2).

    accelerate launch --config_file examples/accelerate_multi_gpu.yaml examples/clip_moe/train_clip_mcl.py \
        --base openai/clip-vit-large-patch14 --data /data/sharegpt4v --num_experts 4 --top_k 2 \
        --output_dir mcl-l14 --per_device_train_batch_size 100 --bf16 --save_steps 1000

The official recipe's values are the defaults (Long-CLIP text on, `--no_long_text` turns it off; AdamW lr 1e-5,
weight decay 0.2, 200 warm-up steps then cosine, 1 epoch per stage, no gradient clipping): `--help` lists them.
Same as `hf-moe mcl ...`; every TrainingArguments flag is accepted. Re-running the command continues the same
job (or refuses if its options or data changed); `--push_to_hub --hub_model_id` pushes `OUTPUT_DIR/moe`.
"""

from hf_moe.clip_moe.mcl import main


if __name__ == "__main__":
    main()
