"""Bad inputs and faults at the library entry points: the processor, the config, the model and from_pretrained
(issue 13). Each case asserts the exact behaviour: the exception type and a message fragment that names the argument,
or the exact output. Where transformers' llava-hf (LlavaProcessor / LlavaForConditionalGeneration, built tiny from
config) has a behaviour, a second test records it next to ours, so a change on either side shows up."""

import base64
import importlib.util
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image

from configuration_qmop import QMoPConfig
from qmop_tools.testing.tiny import build_config, build_processor
from modeling_qmop import QMoPForConditionalGeneration

PROMPT = "USER: <image>\nWhat is shown? ASSISTANT:"
BUDGET = 16  # the `tiny` fixture: 16 visual tokens of 64 patches
IMAGE_TOKEN_ID = build_processor().image_token_id


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def inputs(processor):
    return processor(images=make_image(seed=3), text=PROMPT)


def _pixels(processor, image):
    return processor(images=image, text=PROMPT)["pixel_values"]


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ===================================================================================== processor: image kinds
RGB = np.asarray(make_image(20, 24, seed=5))  # (24, 20, 3) uint8
RGBA = np.concatenate([RGB, np.full(RGB.shape[:2] + (1,), 128, np.uint8)], axis=-1)  # (24, 20, 4)
GRAY = RGB[:, :, 0].copy()  # (24, 20)
HALVES = np.array([0.0, 0.5, 1.0], dtype=np.float32)[np.arange(24 * 20 * 3) % 3].reshape(24, 20, 3)


@pytest.mark.parametrize(
    "given, same_as",
    [
        (lambda: RGBA, lambda: Image.fromarray(RGBA).convert("RGB")),  # alpha dropped
        (lambda: torch.from_numpy(RGBA).permute(2, 0, 1), lambda: Image.fromarray(RGBA).convert("RGB")),  # CHW RGBA
        (lambda: GRAY, lambda: Image.fromarray(GRAY).convert("RGB")),  # 2-D grayscale
        (lambda: GRAY[:, :, None], lambda: Image.fromarray(GRAY).convert("RGB")),  # HW1
        (lambda: GRAY.astype(np.float32) / 255.0, lambda: Image.fromarray(GRAY).convert("RGB")),  # float gray in [0, 1]
        (lambda: torch.from_numpy(HALVES).permute(2, 0, 1).to(torch.bfloat16), lambda: torch.from_numpy(HALVES).permute(2, 0, 1)),
        (lambda: torch.from_numpy(HALVES).to(torch.float16), lambda: HALVES),  # HWC half tensor
        (lambda: RGB.astype(np.int64), lambda: RGB),  # integer dtype other than uint8, values in range
        (lambda: _png_bytes(Image.fromarray(RGB)), lambda: Image.fromarray(RGB)),
        (lambda: "data:image/png;base64," + base64.b64encode(_png_bytes(Image.fromarray(RGB))).decode(), lambda: Image.fromarray(RGB)),
    ],
    ids=["rgba-hwc", "rgba-chw-tensor", "gray-2d", "gray-hw1", "gray-float", "bf16-chw", "fp16-hwc", "int64", "png-bytes",
         "base64"],
)
def test_image_kinds_equal_their_pil_form(processor, given, same_as):
    assert torch.equal(_pixels(processor, given()), _pixels(processor, same_as()))


def test_image_path_equals_the_pil_image(processor, tmp_path):
    path = tmp_path / "picture.png"
    Image.fromarray(RGB).save(path)
    assert torch.equal(_pixels(processor, str(path)), _pixels(processor, Image.fromarray(RGB)))


@pytest.mark.parametrize(
    "image, error, fragment",
    [
        (np.zeros((2, 24, 20, 3), np.uint8), ValueError, "`images`: image 0 is an array of shape (2, 24, 20, 3)"),
        (np.zeros((24, 20, 2), np.uint8), ValueError, "`images`: image 0 is an array of shape (24, 20, 2)"),
        (np.zeros((5, 5, 5), np.uint8), ValueError, "with C = 1, 3 or 4"),
        (RGB.astype(np.float32), ValueError, "float images must lie in [0, 1]"),
        (np.full((24, 20, 3), np.nan, np.float32), ValueError, "`images`: image 0 holds NaN or infinite values"),
        (torch.full((3, 24, 20), float("inf")), ValueError, "holds NaN or infinite values"),
        (np.full((24, 20, 3), -3, np.int16), ValueError, "expected [0, 255]"),
        (np.zeros((24, 20, 3), bool), TypeError, "dtype bool"),
        (np.array([[["a"] * 3] * 4] * 4), TypeError, "expected uint8 or float"),
        (3.5, TypeError, "`images`: image 0 has unsupported type float"),
        (b"\x89PNG not really a png", ValueError, "`images`: image 0 could not be decoded"),
        ("/nonexistent/folder/picture.png", FileNotFoundError, "not an existing file, an http(s) URL or base64"),
        ("picture.png", FileNotFoundError, "'picture.png'"),
        ("http://127.0.0.1:9/picture.png", ValueError, "could not be fetched from the URL 'http://127.0.0.1:9/picture.png'"),
    ],
    ids=["4d", "2-channels", "no-channel-axis", "float-0-255", "nan", "inf-tensor", "negative-int", "bool", "strings",
         "float-scalar", "corrupt-bytes", "missing-path", "missing-relative-path", "unreachable-url"],
)
def test_bad_images_are_named(processor, image, error, fragment):
    with pytest.raises(error) as raised:
        processor(images=image, text=PROMPT)
    assert fragment in str(raised.value)


def test_a_folder_as_image_is_named(processor, tmp_path):
    with pytest.raises(ValueError, match="is the folder"):
        processor(images=str(tmp_path), text=PROMPT)


def test_second_bad_image_is_numbered(processor):
    with pytest.raises(ValueError, match="`images`: image 1 holds NaN"):
        processor(images=[RGB, np.full((4, 4), np.nan)], text=[PROMPT, PROMPT])


# ===================================================================================== processor: other arguments
@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(queries=5), TypeError, "`queries` must be a string or a list of strings"),
        (dict(queries=[1]), TypeError, "`queries` must be a string or a list of strings"),
        (dict(queries={"q": "x"}), TypeError, "`queries`"),
        (dict(queries=["a", "b", "c"]), ValueError, "`queries` has 3 entries"),
        (dict(num_visual_tokens=0), ValueError, "`num_visual_tokens` must be a positive integer, got 0"),
        (dict(num_visual_tokens=-4), ValueError, "`num_visual_tokens` must be a positive integer, got -4"),
        (dict(num_visual_tokens="16"), ValueError, "`num_visual_tokens` must be a positive integer, got '16'"),
        (dict(num_visual_tokens=15), ValueError, "`num_visual_tokens`=15 is not a perfect square"),
        (dict(num_visual_tokens=100), ValueError, "larger than the vision tower's 64 patches"),
        (dict(num_visual_tokens=True), ValueError, "`num_visual_tokens` must be a positive integer"),
        (dict(videos=[np.zeros((2, 8, 8, 3))]), ValueError, "images and text only"),
    ],
    ids=["queries-int", "queries-list-of-int", "queries-dict", "queries-count", "budget-0", "budget-negative",
         "budget-string", "budget-not-square", "budget-too-large", "budget-bool", "videos"],
)
def test_bad_call_arguments_are_named(processor, kwargs, error, fragment):
    with pytest.raises(error) as raised:
        processor(images=make_image(), text=PROMPT, **kwargs)
    assert fragment in str(raised.value)


@pytest.mark.parametrize(
    "images, text, error, fragment",
    [
        (lambda: [make_image(), make_image()], PROMPT, ValueError, "2 images for 1 prompts holding 1 '<image>' placeholders"),
        (lambda: [[make_image()], [make_image()]], PROMPT, ValueError, "1 prompts but 2 image groups"),
        (lambda: [make_image()], [PROMPT, PROMPT], ValueError, "the batch sizes disagree"),
        (lambda: [[make_image(), make_image()]], PROMPT, ValueError, "Prompt 0 has 1 '<image>' placeholder(s) but 2 image(s)"),
        (lambda: make_image(), 5, TypeError, "`text` must be a string or a list of strings"),
        (lambda: make_image(), ["ok", None], TypeError, "`text` must be a string or a list of strings"),
        (lambda: None, None, ValueError, "Pass `images`, `text` or both"),
    ],
    ids=["2-images-1-placeholder", "groups-vs-prompts", "1-image-2-prompts", "group-vs-placeholders", "text-int",
         "text-none-item", "nothing"],
)
def test_image_and_placeholder_counts_must_agree(processor, images, text, error, fragment):
    with pytest.raises(error) as raised:
        processor(images=images(), text=text)
    assert fragment in str(raised.value)


# ===================================================================================== processor vs llava-hf
@pytest.fixture(scope="module")
def llava_processor(processor):
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer, patch_size=6,
                          vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1)


@pytest.mark.parametrize(
    "image, llava_error, llava_fragment",
    [
        (lambda: torch.from_numpy(HALVES).permute(2, 0, 1).to(torch.bfloat16), TypeError, "BFloat16"),
        (lambda: GRAY, ValueError, "Could not make a flat list of images"),
        (lambda: "/nonexistent/folder/picture.png", ValueError, "base64"),
    ],
    ids=["bf16", "gray-2d", "missing-path"],
)
def test_llava_hf_reference_for_image_kinds(processor, llava_processor, image, llava_error, llava_fragment):
    """llava-hf fails on these with errors that do not name the problem (or the argument); QMoP accepts the first two
    and names the third as a missing file."""
    with pytest.raises(llava_error, match=llava_fragment):
        llava_processor(images=image(), text=PROMPT)
    if isinstance(image(), str):
        with pytest.raises(FileNotFoundError, match="not an existing file"):
            processor(images=image(), text=PROMPT)
    else:
        assert processor(images=image(), text=PROMPT)["pixel_values"].shape == (1, 3, 48, 48)


# ===================================================================================== config
@pytest.mark.parametrize(
    "field, value, error, fragment",
    [
        ("resampler_num_layers", "2", TypeError, "`resampler_num_layers` must be an integer, got '2' (str)"),
        ("router_hidden_size", "512", TypeError, "`router_hidden_size` must be an integer, got '512'"),
        ("query_max_length", 77.0, TypeError, "`query_max_length` must be an integer, got 77.0 (float)"),
        ("vision_feature_layer", "-2", TypeError, "`vision_feature_layer` must be an integer"),
        ("image_token_id", "32000", TypeError, "`image_token_id` must be an integer"),
        ("router_top_k", 1.5, TypeError, "`router_top_k` must be an integer"),
        ("resampler_num_heads", True, TypeError, "`resampler_num_heads` must be an integer, got True (bool)"),
        ("router_temperature", "1.0", TypeError, "`router_temperature` must be a finite number"),
        ("router_aux_loss_coef", float("nan"), TypeError, "`router_aux_loss_coef` must be a finite number, got nan"),
        ("router_eval_temperature", "hot", TypeError, "`router_eval_temperature` must be a finite number"),
        ("pruning_recycle", "yes", TypeError, "`pruning_recycle` must be True or False, got 'yes'"),
        ("pad_to_square", 1, TypeError, "`pad_to_square` must be True or False, got 1 (int)"),
        ("num_visual_tokens", 0, ValueError, "`num_visual_tokens` must be a positive integer, got 0"),
        ("num_visual_tokens", "144", ValueError, "`num_visual_tokens` must be a positive integer, got '144'"),
    ],
)
def test_config_field_types(field, value, error, fragment):
    with pytest.raises(error) as raised:
        QMoPConfig(**{field: value})
    assert fragment in str(raised.value)


def test_config_json_with_a_string_field_fails_on_load(tiny_checkpoint, tmp_path):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["resampler_num_layers"] = "2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match="`resampler_num_layers` must be an integer, got '2'"):
        QMoPForConditionalGeneration.from_pretrained(folder)


# ===================================================================================== model inputs
def _with(inputs, **changes):
    values = dict(inputs)
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


@pytest.mark.parametrize(
    "change, error, fragment",
    [
        (lambda i: dict(input_ids=i["input_ids"][0]), ValueError, "`input_ids` must have shape (batch, sequence_length), got (43,)"),
        (lambda i: dict(input_ids=i["input_ids"][None]), ValueError, "`input_ids` must have shape (batch, sequence_length)"),
        (lambda i: dict(input_ids=i["input_ids"].float()), TypeError, "`input_ids` must be integer token ids, got dtype torch.float32"),
        (lambda i: dict(input_ids=i["input_ids"].tolist()), TypeError, "`input_ids` must be a tensor of token ids, got list"),
        (lambda i: dict(pixel_values=i["pixel_values"][0]), ValueError, "`pixel_values` must have shape (num_images, channels, height, width)"),
        (lambda i: dict(pixel_values=i["pixel_values"].long()), TypeError, "`pixel_values` must be a float tensor"),
        (lambda i: dict(pixel_values=i["pixel_values"].numpy()), TypeError, "`pixel_values` must be a tensor"),
        (lambda i: dict(pixel_values=i["pixel_values"].index_fill(3, torch.tensor([0]), float("nan"))), ValueError,
         "`pixel_values` hold 144 NaN or infinite value(s)"),
        (lambda i: dict(pixel_values=i["pixel_values"].index_fill(2, torch.tensor([5]), float("-inf"))), ValueError,
         "`pixel_values` hold 144 NaN or infinite value(s)"),
        (lambda i: dict(pixel_values=i["pixel_values"].repeat(4, 1, 1, 1), query_input_ids=i["query_input_ids"].repeat(4, 1),
                        query_attention_mask=None), ValueError, "4 images for 16 `<image>` placeholders in 1 run(s)"),
        (lambda i: dict(pixel_values=i["pixel_values"].repeat(3, 1, 1, 1)), ValueError, "16 `<image>` placeholders for 3 images"),
        (lambda i: dict(input_ids=i["input_ids"].masked_fill(i["input_ids"] == IMAGE_TOKEN_ID, 5)), ValueError,
         "have no `<image>` placeholder"),
        (lambda i: dict(pixel_values=None), ValueError, "`input_ids` hold 16 `<image>` placeholders but no `pixel_values`"),
        (lambda i: dict(query_input_ids=None, query_attention_mask=None), ValueError, "without `query_input_ids`"),
        (lambda i: dict(query_input_ids=i["query_input_ids"].repeat(2, 1), query_attention_mask=None), ValueError,
         "`query_input_ids` has 2 rows but there are 1 images"),
        (lambda i: dict(query_input_ids=i["query_input_ids"][0]), ValueError, "`query_input_ids` must have shape (batch, sequence_length)"),
        (lambda i: dict(query_input_ids=i["query_input_ids"].float()), TypeError, "`query_input_ids` must be integer token ids"),
        (lambda i: dict(labels=i["input_ids"][:, :-3]), ValueError, "`labels` must have the inputs' shape (batch, sequence_length) = (1, 43), got (1, 40)"),
        (lambda i: dict(labels=i["input_ids"][0]), ValueError, "`labels` must have the inputs' shape"),
        (lambda i: dict(labels=i["input_ids"].float()), TypeError, "`labels` must be an integer tensor of token ids"),
        (lambda i: dict(inputs_embeds=torch.zeros(1, 43, 32)), ValueError, "Pass exactly one of `input_ids` and `inputs_embeds`"),
    ],
    ids=["ids-1d", "ids-3d", "ids-float", "ids-list", "pixels-3d", "pixels-int", "pixels-numpy", "pixels-nan",
         "pixels-inf", "4-images-1-placeholder-run", "3-images-16-placeholders", "no-placeholders",
         "placeholders-without-pixels", "no-query", "query-rows", "query-1d", "query-float", "labels-short",
         "labels-1d", "labels-float", "ids-and-embeds"],
)
def test_bad_model_inputs_are_named(model, inputs, change, error, fragment):
    assert inputs["input_ids"].shape == (1, 43)
    with pytest.raises(error) as raised, torch.no_grad():
        model(**_with(inputs, **change(inputs)))
    assert fragment in str(raised.value)


@pytest.mark.parametrize("budget, fragment", [(0, "must be a positive integer, got 0"), (15, "is not a perfect square"),
                                              (100, "larger than the vision tower's 64 patches")])
def test_get_image_features_budget(model, inputs, budget, fragment):
    with pytest.raises(ValueError, match=fragment), torch.no_grad():
        model.get_image_features(inputs["pixel_values"], inputs["query_input_ids"], inputs["query_attention_mask"],
                                 num_visual_tokens=budget)


def test_generate_with_nan_pixels_fails_before_decoding(model, inputs):
    bad = inputs["pixel_values"].clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="`pixel_values` hold 1 NaN"):
        model.generate(**_with(inputs, pixel_values=bad), max_new_tokens=2)


# ===================================================================================== non-finite weights
EXPERTS = [f"model.projector.{b}_branch.expert.linear_1.weight" for b in ("pooling", "resampler", "pruning")]


def _copy_with_nan(tiny_model, *parameter_names):
    copy = QMoPForConditionalGeneration(tiny_model.config).eval()
    copy.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        for name in parameter_names:
            copy.get_parameter(name).fill_(float("nan"))
    return copy


@pytest.mark.parametrize(
    "parameters",
    [["model.projector.router.linear_1.weight"], ["model.vision_tower.encoder.layers.0.mlp.fc1.weight"], EXPERTS],
    ids=["router", "vision-tower", "experts"],
)
def test_nan_weights_give_nan_logits_not_a_plausible_answer(model, inputs, parameters):
    broken = _copy_with_nan(model, *parameters)
    with torch.no_grad():
        out = broken(**inputs)
    last_placeholder = int((inputs["input_ids"][0] == broken.config.image_token_id).nonzero()[-1])
    assert torch.isnan(out.image_hidden_states).all()
    assert torch.isnan(out.logits[0, last_placeholder:]).all()  # every position from the image on


def test_nan_router_weights_reach_the_output_as_nan(model, inputs):
    """Before: NaN router weights selected no branch, the image became zeros and the logits looked normal."""
    broken = _copy_with_nan(model, "model.projector.router.linear_2.bias")
    with torch.no_grad():
        out = broken(**inputs)
    assert torch.isnan(out.router_weights).all()
    assert torch.isnan(out.logits[:, -1]).all()


# ===================================================================================== model vs llava-hf
@pytest.fixture(scope="module")
def llava(processor):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    qconfig = build_config(processor)
    config = LlavaConfig(vision_config=qconfig.vision_config.to_dict(), text_config=qconfig.text_config.to_dict(),
                         image_token_index=qconfig.image_token_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=64)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def llava_inputs(llava_processor):
    return llava_processor(images=make_image(seed=3), text=PROMPT, return_tensors="pt")


def test_llava_hf_reference_nan_pixels(model, inputs, llava, llava_inputs):
    """llava-hf turns NaN pixels into NaN logits; QMoP refuses them with an error naming `pixel_values`."""
    bad = llava_inputs["pixel_values"].clone()
    bad[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        assert torch.isnan(llava(**_with(llava_inputs, pixel_values=bad)).logits).all()
    with pytest.raises(ValueError, match="`pixel_values` hold 1 NaN"):
        model(**_with(inputs, pixel_values=bad))


def test_llava_hf_reference_nan_projector_weights(model, inputs, llava, llava_inputs):
    """Both give NaN logits for NaN projector weights (before this issue QMoP gave a normal-looking answer when the
    router's weights were NaN)."""
    projector = llava.model.multi_modal_projector if hasattr(llava, "model") and hasattr(llava.model, "multi_modal_projector") else llava.multi_modal_projector
    saved = projector.linear_1.weight.detach().clone()
    try:
        with torch.no_grad():
            projector.linear_1.weight.fill_(float("nan"))
            assert torch.isnan(llava(**llava_inputs).logits[:, -1]).all()
    finally:
        with torch.no_grad():
            projector.linear_1.weight.copy_(saved)
    broken = _copy_with_nan(model, *EXPERTS)
    with torch.no_grad():
        assert torch.isnan(broken(**inputs).logits[:, -1]).all()


def test_llava_hf_reference_image_count_mismatch(model, inputs, llava, llava_inputs):
    """Too many images for the placeholders: both raise "Image features and image tokens do not match"."""
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        llava(**_with(llava_inputs, pixel_values=llava_inputs["pixel_values"].repeat(4, 1, 1, 1)))
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**_with(inputs, pixel_values=inputs["pixel_values"].repeat(4, 1, 1, 1),
                      query_input_ids=inputs["query_input_ids"].repeat(4, 1), query_attention_mask=None))


def test_llava_hf_reference_labels_and_ids(model, inputs, llava, llava_inputs):
    """Wrong-length labels: llava-hf fails inside the loss ("batch_size"), QMoP names `labels`. 1-D input_ids:
    llava-hf fails deep in attention, QMoP names `input_ids`."""
    with pytest.raises(ValueError, match="Expected input batch_size"):
        llava(**llava_inputs, labels=llava_inputs["input_ids"][:, :-3])
    with pytest.raises(RuntimeError):
        llava(input_ids=llava_inputs["input_ids"][0], pixel_values=llava_inputs["pixel_values"])
    with pytest.raises(ValueError, match="`labels`"):
        model(**inputs, labels=inputs["input_ids"][:, :-3])
    with pytest.raises(ValueError, match="`input_ids` must have shape"):
        model(**_with(inputs, input_ids=inputs["input_ids"][0]))


def test_llava_hf_reference_placeholders_without_pixels(model, inputs, llava, llava_inputs):
    """llava-hf runs a prompt full of `<image>` placeholders without pixels (text-only logits of placeholder
    embeddings); QMoP raises."""
    with torch.no_grad():
        assert llava(input_ids=llava_inputs["input_ids"]).logits.shape[1] == llava_inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match="no `pixel_values`"):
        model(input_ids=inputs["input_ids"])


# ===================================================================================== from_pretrained
def test_auto_processor_without_processor_config(tiny_checkpoint, tmp_path, image):
    from transformers import AutoProcessor

    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    os.remove(folder / "processor_config.json")
    loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == "QMoPProcessor" and loaded.num_visual_tokens == BUDGET
    reference = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    a, b = loaded(images=image, text=PROMPT), reference(images=image, text=PROMPT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_processor_folder_without_any_config(tiny_checkpoint, tmp_path):
    from processing_qmop import QMoPProcessor

    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    os.remove(folder / "processor_config.json")
    os.remove(folder / "config.json")
    with pytest.raises(OSError, match="has no processor_config.json and no config.json"):
        QMoPProcessor.from_pretrained(folder)


# ===================================================================================== offloaded vision tower
@pytest.mark.parametrize("settings", [{}, {"pruning_score": "question_relevance", "pruning_recycle": True}],
                         ids=["cls-attention", "question-relevance-recycle"])
def test_offloaded_vision_tower_generates_the_same_tokens(tmp_path, settings):
    """The pruning scores use the feature layer's q/k through hooked module calls, so a vision tower on disk works
    (before: "Keep model.vision_tower on a device")."""
    from qmop_tools.testing.tiny import save_tiny_checkpoint
    from processing_qmop import QMoPProcessor

    folder = save_tiny_checkpoint(str(tmp_path / "ckpt"), num_visual_tokens=BUDGET, **settings)
    processor = QMoPProcessor.from_pretrained(folder)
    batch = processor(images=make_image(seed=2), text=PROMPT)
    expected = QMoPForConditionalGeneration.from_pretrained(folder).eval().generate(**batch, max_new_tokens=6, do_sample=False)
    device_map = {"model.vision_tower": "disk", "model.text_encoder": "cpu", "model.projector": "cpu",
                  "model.language_model": "cpu", "lm_head": "cpu"}
    offloaded = QMoPForConditionalGeneration.from_pretrained(folder, device_map=device_map,
                                                             offload_folder=str(tmp_path / "offload")).eval()
    assert offloaded.hf_device_map["model.vision_tower"] == "disk"
    assert torch.equal(offloaded.generate(**batch, max_new_tokens=6, do_sample=False), expected)


# ===================================================================================== 4-bit saving on CPU (README)
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_4bit_cpu_save_before_any_forward_keeps_outputs(tmp_path):
    """The README's upstream note: on a CPU with AVX-512 BF16, bitsandbytes repacks 4-bit weights into a CPU layout
    at the first forward and saving packs them back lossily, so saving after a forward changes the outputs; saving
    right after loading does not. Other CPUs run the plain dequantising kernel: no repack, nothing changes."""
    from bitsandbytes.functional import has_avx512bf16

    from qmop_tools.testing.tiny import save_tiny_checkpoint
    from processing_qmop import QMoPProcessor

    repacks = bool(has_avx512bf16())  # bitsandbytes' own test for its CPU packing format
    folder = save_tiny_checkpoint(str(tmp_path / "ckpt"), num_visual_tokens=BUDGET, width=64)  # CPU kernels need >32
    batch = QMoPProcessor.from_pretrained(folder)(images=make_image(seed=2), text=PROMPT)
    model = QMoPForConditionalGeneration.from_pretrained(folder, load_in_4bit=True, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "saved-first")
    with torch.no_grad():
        first = model(**batch).logits
        reloaded = QMoPForConditionalGeneration.from_pretrained(tmp_path / "saved-first", dtype=torch.float32).eval()
        if repacks:
            assert torch.equal(reloaded(**batch).logits, first)
        else:  # the reloaded model's first forward may sum in another order (2.4e-7 seen on an AVX2 CPU)
            torch.testing.assert_close(reloaded(**batch).logits, first, rtol=0, atol=1e-5)
        model.save_pretrained(tmp_path / "saved-after-forward")
        # the upstream behaviour the README warns about, where it happens; elsewhere saving changes nothing
        assert torch.equal(model(**batch).logits, first) is not repacks
