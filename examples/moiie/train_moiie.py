"""MoIIE training (stage 1 `--stage pretrain`: the projector only; stage 2 `--stage finetune`: LLM + MoE +
projector, `--moe_only` for the MoE layers only) on LLaVA-format conversations.

    accelerate launch --config_file examples/accelerate_multi_gpu.yaml examples/moiie/train_moiie.py \
        --model moiie-upcycled --data llava_pretrain.json --image_folder images/ --output_dir moiie-stage1 \
        --stage pretrain --per_device_train_batch_size 32 --bf16 --save_steps 1000

Same as `hf-moe train-moiie ...`; runs under plain `python` too. Every TrainingArguments flag is accepted,
including `--deepspeed examples/ds_zero2.json`, `--gradient_checkpointing` and `--push_to_hub --hub_model_id`.
Re-running the command continues the same job, reports a finished one as done, and refuses one whose options,
model or data changed.
"""

from hf_moe.moiie.train import main


if __name__ == "__main__":
    main()
