"""Router training of a CLIP-MoE (CLIP-MoE, stage 2 of 2): only the routers train, with the CLIP loss plus
0.01 x (image + text balance loss).

    accelerate launch --config_file examples/accelerate_multi_gpu.yaml examples/clip_moe/train_clip_moe.py \
        --model mcl-l14/moe --data /data/sharegpt4v --output_dir clip-moe-l14 \
        --per_device_train_batch_size 100 --learning_rate 1e-6 --weight_decay 0.01 --warmup_steps 200 \
        --lr_scheduler_type cosine --num_train_epochs 1 --bf16

Same as `hf-moe train-router ...`; runs under plain `python` too. Every TrainingArguments flag is accepted,
including `--deepspeed examples/ds_zero2.json`.
"""

from hf_moe.clip_moe.train_router import main


if __name__ == "__main__":
    main()
