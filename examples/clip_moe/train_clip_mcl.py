"""MCL expert extraction + CLIP-MoE construction (CLIP-MoE, stage 1 of 2).

    accelerate launch --config_file examples/accelerate_multi_gpu.yaml examples/clip_moe/train_clip_mcl.py \
        --base openai/clip-vit-large-patch14 --data /data/sharegpt4v --num_experts 4 --long_text \
        --output_dir mcl-l14 --per_device_train_batch_size 100 --learning_rate 1e-5 --weight_decay 0.2 \
        --warmup_steps 200 --lr_scheduler_type cosine --num_train_epochs 1 --bf16

Same as `hf-moe mcl ...`; every TrainingArguments flag is accepted.
"""

from hf_moe.clip_moe.mcl import main


if __name__ == "__main__":
    main()
