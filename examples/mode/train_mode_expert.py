"""MoDE data-expert training: the whole seed CLIP trained on expert K's clusters plus a random 2% of the other pairs.

    accelerate launch --config_file examples/accelerate_multi_gpu.yaml examples/mode/train_mode_expert.py \
        --base seed-clip --data shards/ --clusters clusters/ --expert 0 --output_dir expert-0 \
        --per_device_train_batch_size 256 --bf16 --gradient_checkpointing --save_steps 1000 --max_steps 10000

Same as `hf-moe mode train-expert ...`; runs under plain `python` too. Every TrainingArguments flag is accepted.
Re-running the command continues the same job, reports a finished one as done, and refuses one whose options,
seed model, data or clusters changed.
"""

from hf_moe.mode.train_expert import main


if __name__ == "__main__":
    main()
