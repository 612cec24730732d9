"""MoIIE data and inputs are checked before a job starts (issue 14, items 4, 7, 9 and 11): bad conversations,
images, image paths, `--max_length`, data without answer tokens, non-JSON data, a plain Phi-3 as `--model` and a
pickled projector are refused in one line naming the file, sample id and field, and nothing is written."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_moiie_training import SAMPLES, TOKENS_PER_IMAGE, toy_model, toy_processor

from hf_moe.cli import main
from hf_moe.moiie import data as moiie_data
from hf_moe.moiie import toy
from hf_moe.moiie.data import MoIIECollator, load_conversations


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moiie") / "model"
    processor = toy_processor()
    toy_model(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for seed, name in enumerate(["seven.png", "three.png"]):
        pixels = np.random.RandomState(seed).randint(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name)
    return tmp_path


def write(data, samples) -> None:
    text = samples if isinstance(samples, str) else json.dumps(samples)
    (data / "data.json").write_text(text)


def train(model_dir, data, *extra) -> int:
    argv = ["train-moiie", "--model", str(model_dir), "--data", str(data / "data.json")]
    argv += ["--image_folder", str(data / "images"), "--output_dir", str(data / "out"), "--stage", "pretrain"]
    argv += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--save_steps", "1"]
    argv += ["--report_to", "none", "--use_cpu", "--disable_tqdm", "true", *extra]
    return main(argv)


def refused(model_dir, data, capsys, samples, *extra) -> str:
    """Run train-moiie on `samples`: it must fail with a one-line error and write no job record or checkpoint."""
    write(data, samples)
    capsys.readouterr()
    assert train(model_dir, data, *extra) == 1
    err = capsys.readouterr().err
    assert "hf-moe train-moiie: error:" in err and "Traceback" not in err
    out = data / "out"
    assert not (out / "hf_moe_job.json").exists() and not list(out.glob("checkpoint-*"))
    return err


def with_turns(*turns, **fields):
    return [{"id": "a", **fields, "conversations": list(turns)}, *SAMPLES[1:]]


HUMAN = {"from": "human", "value": "<image>\nwhat digit is this ?"}


# item 4: data with no answer tokens


def test_data_without_any_assistant_turn_is_refused(model_dir, data, capsys):
    samples = [
        {"id": s["id"], **({"image": s["image"]} if "image" in s else {}), "conversations": s["conversations"][:1]}
        for s in SAMPLES
    ]
    err = refused(model_dir, data, capsys, samples)
    assert "data.json" in err and "no sample has an answer token" in err


def test_max_length_that_cuts_every_answer_is_refused(model_dir, data, capsys):
    text_only = [{"id": str(i), "conversations": SAMPLES[1]["conversations"]} for i in range(3)]
    err = refused(model_dir, data, capsys, text_only, "--max_length", "3")
    assert "no sample has an answer token" in err and "--max_length=3" in err


def test_samples_without_answer_tokens_are_counted_in_a_warning(data, caplog):
    samples = [*SAMPLES, {"id": "q", "conversations": [{"from": "human", "value": "is three even ?"}]}]
    write(data, samples)
    dataset = load_conversations(data / "data.json", data / "images")
    stats = moiie_data.check_conversations(dataset, toy_processor(), data / "data.json", disable_progress=True)
    assert stats == {"samples": 4, "without_answer": 1}
    assert "1 of 4 samples" in caplog.text and "['q']" in caplog.text


# item 7 / 9: conversations, images and data checked before the job starts, in one line


@pytest.mark.parametrize(
    "turn, field, words",
    [
        ({"from": "robot", "value": "seven"}, "conversations[1].from", "unknown role 'robot'"),
        ({"value": "seven"}, "conversations[1].from", "unknown role missing"),
        ({"from": "gpt"}, "conversations[1].value", "missing"),
        ({"from": "gpt", "value": 7}, "conversations[1].value", "int 7"),
        ("seven", "conversations[1]", "must be a turn"),
    ],
)
def test_bad_turns_are_refused_by_sample_and_field(model_dir, data, capsys, turn, field, words):
    err = refused(model_dir, data, capsys, with_turns(HUMAN, turn, image="seven.png"))
    assert f"sample 'a', field '{field}'" in err and words in err and "data.json" in err


def test_conversations_that_are_not_a_list_are_refused(model_dir, data, capsys):
    samples = [{"id": "a", "conversations": "human: what digit ? gpt: seven"}, *SAMPLES[1:]]
    err = refused(model_dir, data, capsys, samples)
    assert "sample 'a', field 'conversations'" in err and "must be a list" in err


def test_a_sample_without_conversations_is_refused(model_dir, data, capsys):
    err = refused(model_dir, data, capsys, [{"id": "z", "image": "seven.png"}, *SAMPLES[1:]])
    assert "sample 'z', field 'conversations'" in err and "missing" in err
    err = refused(model_dir, data, capsys, [{"id": "z", "prompt": "hi"}])
    assert "field 'conversations'" in err


def test_the_sample_index_names_a_sample_without_id(model_dir, data, capsys):
    samples = [*SAMPLES, {"conversations": [HUMAN, {"from": "gpt"}]}]
    assert "sample '3', field 'conversations[1].value'" in refused(model_dir, data, capsys, samples)


def test_image_placeholder_count_must_match_the_images(model_dir, data, capsys):
    two = {"from": "human", "value": "<image>\n<image>\nwhat digit is this ?"}
    err = refused(model_dir, data, capsys, with_turns(two, {"from": "gpt", "value": "seven"}, image="seven.png"))
    assert "sample 'a', field 'conversations'" in err and "2 image placeholder(s)" in err and "1 image(s)" in err
    err = refused(model_dir, data, capsys, with_turns(HUMAN, {"from": "gpt", "value": "seven"}))
    assert "1 image placeholder(s)" in err and "0 image(s)" in err


def test_missing_image_is_refused_before_the_job_starts(model_dir, data, capsys):
    (data / "images" / "three.png").unlink()
    err = refused(model_dir, data, capsys, SAMPLES)
    assert "sample 'c', field 'image'" in err and "three.png" in err and "does not exist" in err


def test_missing_image_folder_is_named(model_dir, data, capsys):
    (data / "images" / "seven.png").unlink()
    (data / "images" / "three.png").unlink()
    (data / "images").rmdir()
    err = refused(model_dir, data, capsys, SAMPLES)
    assert "image folder" in err and "images' (of the images of" in err


@pytest.mark.parametrize("name", ["three.png", "three.jpg"])
def test_corrupt_or_truncated_image_is_refused(model_dir, data, capsys, name):
    path = data / "images" / name
    pixels = np.random.RandomState(1).randint(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    samples = [*SAMPLES[:2], {**SAMPLES[2], "image": name}]
    err = refused(model_dir, data, capsys, samples)
    assert "sample 'c', field 'image'" in err and name in err and "corrupt or truncated" in err


def test_garbage_image_file_is_refused(model_dir, data, capsys):
    (data / "images" / "three.png").write_bytes(b"not an image at all")
    err = refused(model_dir, data, capsys, SAMPLES)
    assert "sample 'c', field 'image'" in err and "three.png" in err


def test_max_length_cutting_inside_an_image_is_refused(model_dir, data, capsys):
    # the human turn renders as a few template tokens, then the image's TOKENS_PER_IMAGE tokens
    err = refused(model_dir, data, capsys, SAMPLES, "--max_length", "3")
    assert "sample 'a', field '--max_length'" in err and "cut into its image tokens" in err


@pytest.mark.parametrize(
    "text, words",
    [("hello, this is not JSON", "line 1 column 1"), (json.dumps(SAMPLES)[:-20], "data.json"), ("", "data.json")],
)
def test_data_that_is_not_json_is_refused(model_dir, data, capsys, text, words):
    err = refused(model_dir, data, capsys, text)
    assert "not a LLaVA-format conversation file" in err and words in err


def test_a_plain_phi3_is_refused_as_model(data, capsys, tmp_path):
    from transformers import Phi3ForCausalLM

    processor = toy_processor()
    phi3 = tmp_path / "phi3"
    Phi3ForCausalLM(toy.toy_text_config(processor.tokenizer)).save_pretrained(phi3)
    processor.tokenizer.save_pretrained(phi3)
    err = refused(phi3, data, capsys, SAMPLES)
    assert "'phi3'" in err and "upcycle-moiie" in err


def test_bad_turns_give_a_value_error_in_the_collator_too():
    rows = [{"id": "a", "images": [], "conversations": [{"from": "human"}]}]
    with pytest.raises(ValueError, match=r"Sample 'a', field 'conversations\[0\].value'"):
        MoIIECollator(toy_processor())(rows)


def test_corrupt_image_in_the_collator_is_named(data):
    (data / "images" / "three.png").write_bytes(b"garbage")
    rows = [{"id": "c", "images": [str(data / "images" / "three.png")], "conversations": SAMPLES[2]["conversations"]}]
    with pytest.raises(OSError, match="three.png of sample 'c' is corrupt"):
        MoIIECollator(toy_processor())(rows)


# item 11: image paths stay inside the image folder


@pytest.mark.parametrize("kind", ["parent", "absolute", "list"])
def test_image_paths_outside_the_folder_are_refused_unless_allowed(model_dir, data, capsys, monkeypatch, kind):
    outside = data / "outside.png"
    (data / "images" / "seven.png").rename(outside)
    (data / "images" / "sub").mkdir()
    name = {"parent": "../outside.png", "absolute": str(outside), "list": ["three.png", "sub/../../outside.png"]}[kind]
    placeholders = "<image>\n" * (2 if kind == "list" else 1)
    turns = [{"from": "human", "value": placeholders + "what digit ?"}, {"from": "gpt", "value": "seven"}]
    samples = [{"id": "a", "image": name, "conversations": turns}, *SAMPLES[1:]]
    err = refused(model_dir, data, capsys, samples)
    assert "sample 'a', field 'image'" in err and "outside.png" in err and "--allow_outside_image_paths" in err

    # allowed explicitly (the option, or the environment variable the other commands read): the check passes
    dataset = load_conversations(data / "data.json", data / "images", allow_outside_image_paths=True)
    monkeypatch.setenv("HF_MOE_ALLOW_OUTSIDE_IMAGE_PATHS", "1")
    assert load_conversations(data / "data.json", data / "images")["images"] == dataset["images"]
    assert str(outside) in [os.path.abspath(path) for path in dataset["images"][0]]
    stats = moiie_data.check_conversations(dataset, toy_processor(), data / "data.json", disable_progress=True)
    assert stats["without_answer"] == 0


def test_paths_that_stay_inside_the_folder_are_accepted(data):
    (data / "images" / "sub").mkdir()
    samples = [{**SAMPLES[0], "image": "sub/../seven.png"}, *SAMPLES[1:]]
    write(data, samples)
    dataset = load_conversations(data / "data.json", data / "images")
    assert (
        moiie_data.check_conversations(dataset, toy_processor(), data / "data.json", disable_progress=True)["samples"]
        == 3
    )


def test_checked_data_trains(model_dir, data):
    write(data, SAMPLES)
    assert train(model_dir, data) == 0
    assert json.loads((data / "out" / "hf_moe_job.json").read_text())["complete"]


def test_check_uses_the_training_token_count():
    # the check counts an image's tokens as the collator does from the processed pixels, so --max_length agrees
    assert MoIIECollator(toy_processor()).tokens_for_size(640, 480) == TOKENS_PER_IMAGE
    for do_resize in (True, False):  # a fixed size, or (no resizing) the image's own
        processor = toy_processor()
        processor.num_image_tokens, processor.patch_size = None, 8
        processor.image_processor.do_resize = do_resize
        collator = MoIIECollator(processor)
        for size in [(40, 24), (16, 16), (100, 60)]:
            pixels = np.random.RandomState(0).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            processed = processor.image_processor([Image.fromarray(pixels)], return_tensors="pt")["pixel_values"][0]
            assert collator.tokens_for_size(*size) == processor.tokens_per_image(*map(int, processed.shape[-2:]))
        assert (collator.tokens_for_size(40, 24) == 4) == do_resize


# item 9: a pickled projector is refused and never run


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_projector_is_refused_and_never_run(tmp_path, capsys):
    from hf_moe.conversion.upcycle_moiie import read_projector

    marker = tmp_path / "pwned"
    folder = tmp_path / "projector"
    folder.mkdir()
    torch.save({"model.mm_projector.0.weight": Evil(marker)}, folder / "mm_projector.bin")
    with pytest.raises(ValueError, match=r"mm_projector.bin' holds a pickled weights file with Python objects"):
        read_projector(folder)
    assert not marker.exists()

    processor = toy_processor()
    llm = tmp_path / "llm"
    from transformers import Phi3ForCausalLM

    Phi3ForCausalLM(toy.toy_text_config(processor.tokenizer)).save_pretrained(llm)
    processor.tokenizer.save_pretrained(llm)
    vision = tmp_path / "vision"
    from transformers import SiglipVisionModel

    SiglipVisionModel(toy.toy_vision_config(image_size=16, patch_size=8)).save_pretrained(vision)
    argv = ["upcycle-moiie", "--llm", str(llm), "--vision", str(vision), "--projector", str(folder)]
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "hf-moe upcycle-moiie: error:" in err and "Python objects besides tensors" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out" / "model.safetensors").exists()


def test_plain_tensor_projector_bin_still_loads(tmp_path):
    from hf_moe.conversion.upcycle_moiie import read_projector

    folder = tmp_path / "projector"
    folder.mkdir()
    state = {f"model.mm_projector.{i}.{p}": torch.zeros(2) for i in (0, 2) for p in ("weight", "bias")}
    torch.save(state, folder / "mm_projector.bin")
    assert sorted(read_projector(folder)) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    (folder / "mm_projector.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(OSError, match="corrupt or truncated"):
        read_projector(folder)


def test_the_check_agrees_with_the_collator_at_every_max_length():
    processor = toy_processor()
    rows = [
        {"id": "a", "images": ["x"], "conversations": SAMPLES[0]["conversations"]},
        {"id": "b", "images": [], "conversations": SAMPLES[1]["conversations"]},
        {"id": "q", "images": [], "conversations": SAMPLES[1]["conversations"][:1]},
        {
            "id": "two",
            "images": ["x", "y"],
            "conversations": [
                {"from": "human", "value": "<image>\nwhat digit ?"},
                {"from": "gpt", "value": "seven"},
                {"from": "human", "value": "<image>\nand this ?"},
                {"from": "gpt", "value": "three"},
            ],
        },
    ]
    tokens = {"a": [5], "b": [], "q": [], "two": [3, 6]}
    checked = 0
    for max_length in [None, *range(1, 60)]:
        collator = MoIIECollator(processor, max_length=max_length)
        for row in rows:
            try:
                labels = collator.encode(row, tokens[row["id"]])["labels"]
                expected = any(label != -100 for label in labels)
            except ValueError as err:
                expected = str(err)
            try:
                got = collator.check(row, tokens[row["id"]])
            except ValueError as err:
                got = str(err)
            assert got == expected, (row["id"], max_length)
            checked += isinstance(expected, str)
    assert checked  # some lengths cut into images


def test_llava_folder_with_pickled_objects_is_refused_and_never_run(tmp_path, capsys):
    from test_upcycle_moiie import TEXT
    from transformers import Phi3ForCausalLM

    from moiie_dense import save_dense_parts

    save_dense_parts(tmp_path, TEXT, Phi3ForCausalLM, "phi3")
    marker = tmp_path / "pwned"
    (tmp_path / "llava" / "model.safetensors").unlink()
    torch.save({"model.language_model.embed_tokens.weight": Evil(marker)}, tmp_path / "llava" / "pytorch_model.bin")
    assert main(["upcycle-moiie", "--llm", str(tmp_path / "llava"), "--output_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "hf-moe upcycle-moiie: error:" in err and "llava' holds a pickled weights file" in err
    assert "Traceback" not in err and not marker.exists() and not (tmp_path / "out" / "config.json").exists()
