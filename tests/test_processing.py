import io

import numpy as np
import pytest
import torch
from conftest import make_image

from processing_qmop import QMoPProcessor, expand_to_square, extract_question

PROMPT = "USER: <image>\nWhat colour is the circle? ASSISTANT:"


@pytest.fixture(scope="module")
def processor():
    from qmop_tools.testing.tiny import build_processor

    return build_processor(num_visual_tokens=16)


def _query_text(processor, ids, mask):
    return processor.query_tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip()


def test_outputs_and_placeholder_expansion(processor, image):
    out = processor(images=[image, image], text=[PROMPT, "USER: <image>\nHow many? ASSISTANT:"])
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "query_input_ids", "query_attention_mask"}
    assert out["pixel_values"].shape == (2, 3, 48, 48)
    assert out["query_input_ids"].shape[0] == 2
    assert ((out["input_ids"] == processor.image_token_id).sum(dim=1) == 16).all()
    # left padding: the shorter prompt is padded at the start, so both end on "ASSISTANT:"
    assert out["attention_mask"][1, 0] == 0 and out["attention_mask"][:, -1].all()
    assert _query_text(processor, out["query_input_ids"][0], out["query_attention_mask"][0]) == "what colour is the circle?"
    assert _query_text(processor, out["query_input_ids"][1], out["query_attention_mask"][1]) == "how many?"


def test_budget_per_call(processor, image):
    out = processor(images=image, text=PROMPT, num_visual_tokens=4)
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 4
    for bad in (5, 81, 0):
        with pytest.raises(ValueError, match="num_visual_tokens"):
            processor(images=image, text=PROMPT, num_visual_tokens=bad)


def test_query_extraction():
    assert extract_question("USER: <image>\nWhat is it? ASSISTANT:", "<image>") == "What is it?"
    system = "A chat between a curious user and an assistant. USER: <image>\nWhere is the dog? ASSISTANT:"
    assert extract_question(system, "<image>") == "Where is the dog?"
    multi_turn = "USER: <image>\nDescribe it. ASSISTANT: A dog. USER: <image>\nAnd this one? ASSISTANT:"
    assert extract_question(multi_turn, "<image>", 0) == "Describe it."
    assert extract_question(multi_turn, "<image>", 1) == "And this one?"
    assert extract_question("<image>\nWhat colour?", "<image>") == "What colour?"


def test_chat_template_and_query_from_messages(processor, image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which shape is red?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhich shape is red? ASSISTANT:"
    out = processor(images=image, text=prompt)
    assert _query_text(processor, out["query_input_ids"][0], out["query_attention_mask"][0]) == "which shape is red?"


def test_queries_override_and_validation(processor, image):
    out = processor(images=[[image, image]], text=["USER: <image><image>\nCompare. ASSISTANT:"], queries=["first", "second"])
    assert _query_text(processor, out["query_input_ids"][1], out["query_attention_mask"][1]) == "second"
    shared = processor(images=[[image, image]], text=["USER: <image><image>\nCompare. ASSISTANT:"], queries="shared")
    assert shared["query_input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="queries"):
        processor(images=[image], text=[PROMPT], queries=["a", "b", "c"])


def test_long_query_is_truncated_with_a_warning(processor, image, caplog):
    import logging

    import processing_qmop

    processing_qmop.logger.warning_once.cache_clear()  # warn-once state from earlier tests
    long_question = " ".join(["what colour is the small square in the top left corner"] * 20)
    with caplog.at_level(logging.WARNING, logger=processing_qmop.logger.name):
        out = processor(images=image, text=f"USER: <image>\n{long_question} ASSISTANT:")
    assert any("truncated" in record.getMessage() for record in caplog.records)
    assert out["query_input_ids"].shape[1] == 77
    assert out["query_input_ids"][0, -1] == processor.query_tokenizer.eos_token_id  # EOS kept after truncation


def test_empty_question_is_captioning(processor, image):
    for text in (None, ""):
        out = processor(images=image, text=text)
        assert out["query_attention_mask"].sum() == 2  # start + end of text only
        assert int((out["input_ids"] == processor.image_token_id).sum()) == 16


def test_prompt_without_image_token_gets_one_prepended(processor, image):
    out = processor(images=image, text="What is this?")
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 16
    assert _query_text(processor, out["query_input_ids"][0], out["query_attention_mask"][0]) == "what is this?"


def test_mismatches_raise(processor, image):
    with pytest.raises(ValueError, match="placeholder"):
        processor(images=[[image, image]], text=[PROMPT])  # 1 <image>, 2 images
    with pytest.raises(ValueError, match="batch sizes disagree"):
        processor(images=[image, image, image], text=[PROMPT, PROMPT])
    with pytest.raises(ValueError, match="image groups"):
        processor(images=[[image], [image]], text=[PROMPT])
    with pytest.raises(TypeError, match="text"):
        processor(images=image, text=[1, 2])
    with pytest.raises(ValueError, match="images"):
        processor()


def test_text_only_prompt_has_no_image_outputs(processor):
    out = processor(text="USER: Hello ASSISTANT:")
    assert set(out) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: make_image(mode="L"),  # grayscale
        lambda: make_image(mode="RGBA"),
        lambda: make_image(width=1, height=1),  # tiny
        lambda: make_image(width=1600, height=1200),  # huge
        lambda: make_image(width=90, height=20),  # non-square
        lambda: np.asarray(make_image()),  # HWC uint8 array
        lambda: torch.from_numpy(np.array(make_image())).permute(2, 0, 1).contiguous(),  # CHW tensor
        lambda: _png_bytes(make_image()),
    ],
)
def test_image_kinds(processor, make):
    out = processor(images=make(), text=PROMPT)
    assert out["pixel_values"].shape == (1, 3, 48, 48)
    assert torch.isfinite(out["pixel_values"]).all()


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_corrupt_and_unsupported_images(processor):
    with pytest.raises(ValueError, match="could not be decoded"):
        processor(images=b"\x89PNG not really a png", text=PROMPT)
    with pytest.raises(TypeError, match="unsupported type"):
        processor(images=3.5, text=PROMPT)


def test_pad_to_square_uses_mean_colour(processor):
    wide = make_image(width=90, height=30)
    squared = expand_to_square(wide, (10, 20, 30))
    assert squared.size == (90, 90) and squared.getpixel((0, 0)) == (10, 20, 30)
    padded = processor(images=wide, text=PROMPT, pad_to_square=True)["pixel_values"]
    cropped = processor(images=wide, text=PROMPT)["pixel_values"]
    assert not torch.allclose(padded, cropped)
    # the padded band is the image mean colour, which normalises to ~0
    assert padded[0, :, 0, :].abs().max() < 0.02


def test_save_and_load_round_trip(processor, image, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "query_tokenizer" / "tokenizer.json").exists()
    assert (tmp_path / "processing_qmop.py").exists() and (tmp_path / "chat_template.jinja").exists()
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    loaded = QMoPProcessor.from_pretrained(tmp_path)
    a, b = processor(images=image, text=PROMPT), loaded(images=image, text=PROMPT)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert loaded.num_visual_tokens == 16 and loaded.chat_template == processor.chat_template


def test_processor_needs_image_token():
    from qmop_tools.testing.tiny import build_processor

    base = build_processor()
    with pytest.raises(ValueError, match="image placeholder"):
        QMoPProcessor(base.image_processor, base.tokenizer, base.query_tokenizer, image_token="<img>")


def test_loading_from_a_model_folder_warns_of_nothing(tiny_checkpoint, image):
    """QMoPProcessor.from_pretrained on a full checkpoint (config.json of type qmop_llava), without remote code: the
    tokenizers load without transformers' "model of type `qmop_llava` to instantiate a model of type ``" warning,
    and the processor is the one AutoProcessor loads with remote code."""
    import logging

    from transformers import AutoProcessor

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    collect = Collect()
    library = logging.getLogger("transformers")
    library.addHandler(collect)
    try:
        loaded = QMoPProcessor.from_pretrained(tiny_checkpoint)
    finally:
        library.removeHandler(collect)
    assert not [m for m in collect.messages if "instantiate a model of type" in m], collect.messages
    auto = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    a, b = loaded(images=image, text=PROMPT), auto(images=image, text=PROMPT)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
