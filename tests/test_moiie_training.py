"""MoIIE training data and Trainer: LLaVA-format JSON + image folder, labels masked to the assistant turns,
text-only samples, a missing image named, the stages' trainable parameters, a falling loss, logged keys."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hf_moe.modeling import MoIIEConfig, MoIIEPhi3ForCausalLM, MoIIEProcessor
from hf_moe.moiie import toy
from hf_moe.moiie.data import IGNORE_INDEX, MoIIECollator, load_conversations
from hf_moe.moiie.trainer import MoIIETrainer, MoIIETrainingArguments


WORDS = "what digit is this ? seven three even yes no".split()
TOKENS_PER_IMAGE = 4


def toy_processor() -> MoIIEProcessor:
    return toy.toy_processor(WORDS, image_size=16, num_image_tokens=TOKENS_PER_IMAGE)


def toy_model(processor: MoIIEProcessor) -> MoIIEPhi3ForCausalLM:
    config = MoIIEConfig(
        vision_config=toy.toy_vision_config(image_size=16, patch_size=8).to_dict(),
        text_config=toy.toy_text_config(processor.tokenizer).to_dict(),
        image_token_id=processor.image_token_id,
    )
    torch.manual_seed(0)
    return MoIIEPhi3ForCausalLM(config)


SAMPLES = [
    {
        "id": "a",
        "image": "seven.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat digit is this ?"},
            {"from": "gpt", "value": "seven"},
            {"from": "human", "value": "is this even ?"},
            {"from": "gpt", "value": "no"},
        ],
    },
    {"id": "b", "conversations": [{"from": "human", "value": "is three even ?"}, {"from": "gpt", "value": "no"}]},
    {
        "id": "c",
        "image": "three.png",
        "conversations": [{"from": "human", "value": "<image>\nwhat digit ?"}, {"from": "gpt", "value": "three"}],
    },
]


@pytest.fixture
def data(tmp_path):
    for seed, name in enumerate(["seven.png", "three.png"]):
        pixels = np.random.RandomState(seed).randint(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)
    (tmp_path / "data.json").write_text(json.dumps(SAMPLES))
    return tmp_path


def test_labels_keep_exactly_the_assistant_turns(data):
    processor = toy_processor()
    dataset = load_conversations(data / "data.json", data)
    assert dataset["images"][1] == [] and dataset["images"][0] == [str(data / "seven.png")]
    batch = MoIIECollator(processor)([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["token_type_ids"].sum(1).tolist() == [TOKENS_PER_IMAGE, 0, TOKENS_PER_IMAGE]
    tokenizer = processor.tokenizer
    answers = ["seven<|end|>no<|end|>", "no<|end|>", "three<|end|>"]
    for row, expected in zip(range(3), answers):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert tokenizer.decode(kept).replace(" ", "").replace("\n", "") == expected
        # every kept label is the input token at its position; padding is masked
        positions = labels != IGNORE_INDEX
        assert torch.equal(batch["input_ids"][row][positions], labels[positions])
        assert not (positions & ~batch["attention_mask"][row].bool()).any()
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # the text-only row is padded


def test_missing_image_is_named(data):
    (data / "three.png").unlink()
    with pytest.raises(FileNotFoundError, match="three.png"):
        load_conversations(data / "data.json", data)
    dataset = load_conversations(data / "data.json", data, check_images=False)
    with pytest.raises(FileNotFoundError, match="three.png"):
        MoIIECollator(toy_processor())([dataset[2]])


def trainer_for(tmp_path, data, **kwargs):
    processor = toy_processor()
    model = toy_model(processor)
    dataset = load_conversations(data / "data.json", data)
    dataset = dataset.select([0, 1, 2] * 4)
    args = MoIIETrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=3,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        **kwargs,
    )
    return MoIIETrainer(model=model, args=args, train_dataset=dataset, data_collator=MoIIECollator(processor))


def trained_names(trainer) -> set[str]:
    model = trainer.model
    model.zero_grad()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(model.train(), batch).backward()
    return {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_stage_defaults_and_gradients_reach_exactly_the_stage_parameters(tmp_path, data):
    pretrain = trainer_for(tmp_path, data, stage="pretrain")
    assert pretrain.args.learning_rate == 5e-4
    names = trained_names(pretrain)
    assert names and all("multi_modal_projector." in name for name in names)
    assert names == {n for n, p in pretrain.model.named_parameters() if p.requires_grad}

    moe = trainer_for(tmp_path, data, stage="finetune", moe_only=True)
    assert moe.args.learning_rate == 2e-5
    names = trained_names(moe)
    assert names and all(".mlp.experts." in n or "_router." in n for n in names)
    assert {n.split(".mlp.")[1].split(".")[0] for n in names} == {"experts", "vision_router", "language_router"}

    finetune = trainer_for(tmp_path, data, stage="finetune")
    names = trained_names(finetune)
    assert not any("vision_tower." in n for n in names)
    assert any("multi_modal_projector." in n for n in names) and any(".mlp.experts." in n for n in names)
    assert any("self_attn." in n for n in names)
    with pytest.raises(ValueError, match="finetune"):
        MoIIETrainingArguments(output_dir=str(tmp_path), stage="pretrain", moe_only=True)


def test_training_lowers_the_loss_and_logs_losses_and_expert_load(tmp_path, data):
    trainer = trainer_for(tmp_path, data, stage="finetune", learning_rate=3e-3, max_steps=8, log_expert_load="full")
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    with torch.no_grad():
        before = model.eval()(**batch).loss.item()
    trainer.train()
    with torch.no_grad():
        after = model.eval()(**batch).loss.item()
    assert after < before
    logs = [entry for entry in trainer.state.log_history if "lm_loss" in entry]
    assert logs
    entry = logs[-1]
    for key in ("loss", "lm_loss", "vision_aux_loss", "language_aux_loss"):
        assert key in entry
    layers = model.config.moe_layers
    for modality in ("vision", "language"):
        assert f"expert_load/{modality}/layer_{layers[0]}/max_ratio" in entry
    # vision tokens never use the language-only expert, language tokens never the vision-only one
    last = model.config.num_local_experts - 1
    assert entry[f"expert_load/vision/layer_{layers[0]}/expert_{last}"] == 0
    assert entry[f"expert_load/language/layer_{layers[0]}/expert_0"] == 0
