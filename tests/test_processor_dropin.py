"""QMoPProcessor as ProcessorMixin users expect it: keyword arguments routed to the image processor or the tokenizer,
padding options that reach the question rows, component keyword arguments and every chat-template layout on load."""

import json
import os

import pytest
import torch
from conftest import make_image

from qmop_tools.testing.tiny import build_processor
from processing_qmop import QMoPProcessor

PROMPT = "USER: <image>\nWhat colour is the circle? ASSISTANT:"
LONGER = "USER: <image>\nHow many objects are there in the picture, counting every one? ASSISTANT:"


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_image_processor_kwargs_are_routed(processor):
    image = make_image()
    plain = processor(images=image, text=PROMPT)["pixel_values"]
    raw = processor(images=image, text=PROMPT, do_normalize=False)["pixel_values"]
    assert raw.min() >= 0 and raw.max() <= 1  # rescaled to [0, 1], not normalised
    assert plain.min() < 0
    mean, std = torch.tensor(processor.image_processor.image_mean), torch.tensor(processor.image_processor.image_std)
    assert torch.allclose(plain, (raw - mean[:, None, None]) / std[:, None, None], atol=1e-5)
    per_modality = processor(images=image, text=PROMPT, images_kwargs={"do_normalize": False})["pixel_values"]
    assert torch.equal(per_modality, raw)


def test_tokenizer_kwargs_are_routed(processor):
    images = [make_image(seed=1), make_image(seed=2)]
    left = processor(images=images, text=[PROMPT, LONGER])
    right = processor(images=images, text=[PROMPT, LONGER], padding_side="right")
    assert left["attention_mask"][0, 0] == 0 and right["attention_mask"][0, -1] == 0
    assert torch.equal(left["input_ids"][0][left["attention_mask"][0] == 1], right["input_ids"][0][right["attention_mask"][0] == 1])
    lists = processor(images=images[0], text=PROMPT, return_tensors=None)
    assert isinstance(lists["input_ids"], list)


def test_max_length_padding_reaches_the_questions(processor):
    one = processor(images=make_image(seed=1), text=PROMPT, padding="max_length", max_length=80)
    other = processor(images=make_image(seed=2), text=LONGER, padding="max_length", max_length=80)
    assert one["input_ids"].shape == other["input_ids"].shape == (1, 80)
    assert one["query_input_ids"].shape == other["query_input_ids"].shape == (1, processor.query_max_length)
    assert int(one["query_attention_mask"].sum()) < processor.query_max_length  # padded, after the EOS
    # Without max_length padding the question rows are as long as the longest question.
    assert processor(images=make_image(), text=PROMPT)["query_input_ids"].shape[1] < processor.query_max_length


def test_from_pretrained_passes_component_kwargs(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = QMoPProcessor.from_pretrained(tmp_path, do_normalize=False, num_visual_tokens=9)
    assert loaded.image_processor.do_normalize is False
    assert loaded.num_visual_tokens == 9
    assert QMoPProcessor.from_pretrained(tmp_path).image_processor.do_normalize is True


def test_legacy_chat_template_json(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    os.remove(tmp_path / "chat_template.jinja")
    with open(tmp_path / "chat_template.json", "w") as f:
        json.dump({"chat_template": "{{ 'legacy' }}"}, f)
    assert QMoPProcessor.from_pretrained(tmp_path).chat_template == "{{ 'legacy' }}"


def test_dict_chat_templates_round_trip(tmp_path):
    templates = {"default": "{{ 'default' }}", "short": "{{ 'short' }}"}
    processor = build_processor(chat_template=templates)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "additional_chat_templates" / "short.jinja").is_file()
    loaded = QMoPProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == templates
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert loaded.apply_chat_template(messages, chat_template="short") == "short"


EMPTY_MEDIA = {
    "videos=[]": {"videos": []},
    "videos=None": {"videos": None},
    "videos=()": {"videos": ()},
    "videos=[[]]": {"videos": [[]]},  # gathered per prompt, none for this one
    "videos=[None]": {"videos": [None]},
    "audio=[]": {"audio": []},
    "audio=[[], []]": {"audio": [[], []]},
    "audios=[]": {"audios": []},  # lmms-eval's name
    "videos=[], audios=[]": {"videos": [], "audios": []},  # lmms-eval's `huggingface` entry passes both
}


@pytest.mark.parametrize("media", list(EMPTY_MEDIA.values()), ids=list(EMPTY_MEDIA))
def test_empty_videos_and_audio_are_accepted_as_llava_accepts_them(processor, media):
    """Modalities QMoP does not read, passed empty (as evaluation harnesses pass them): accepted, and the output is
    the one without them. transformers' LlavaProcessor accepts the same (`audios`, the old name of `audio`, aside:
    transformers 5 rejects it there)."""
    from transformers import LlavaProcessor

    image = make_image()
    expected = processor(images=[image], text=[PROMPT])
    got = processor(images=[image], text=[PROMPT], **media)
    assert set(got) == set(expected)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    if "audios" not in media:
        llava = LlavaProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                               patch_size=processor.patch_size, vision_feature_select_strategy="full",
                               num_additional_image_tokens=0)
        assert "pixel_values" in llava(images=[image], text=[PROMPT], **media)


@pytest.mark.parametrize("media", [{"videos": [[make_image()]]}, {"audio": [[0.0] * 160]}, {"audios": [[0.0] * 160]}],
                         ids=["videos", "audio", "audios"])
def test_videos_and_audio_with_content_are_rejected(processor, media):
    with pytest.raises(ValueError, match="images and text only"):
        processor(images=[make_image()], text=[PROMPT], **media)
