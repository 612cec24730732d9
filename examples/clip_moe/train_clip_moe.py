"""Router training of a CLIP-MoE (CLIP-MoE, stage 2 of 2): only the routers train, with the CLIP loss plus
0.01 x (image + text balance loss).

    accelerate launch --config_file examples/accelerate_multi_gpu.yaml examples/clip_moe/train_clip_moe.py \
        --model mcl-l14/moe --data /data/sharegpt4v --output_dir clip-moe-l14 \
        --per_device_train_batch_size 100 --bf16 --save_steps 1000

The official recipe's values are the defaults (AdamW lr 1e-6, weight decay 0.01, 200 warm-up steps then cosine,
1 epoch, no gradient clipping, expert dropout 0.1): `--help` lists them. `--balance_loss_weights official`
weights the balance losses as the official release effectively did (0.01/W image, 0.005/W text, W processes).
Same as `hf-moe train-router ...`; runs under plain `python` too. Every TrainingArguments flag is accepted,
including `--deepspeed examples/ds_zero2.json` and `--push_to_hub --hub_model_id`. Re-running the command
continues the same job, reports a finished one as done, and refuses one whose options, model or data changed.
"""

from hf_moe.clip_moe.train_router import main


if __name__ == "__main__":
    main()
