"""transformers' own common model tests (ModelTesterMixin) against QMoP-LLaVA, with a tester modelled on
transformers' LLaVA tester (tests/models/llava/test_modeling_llava.py). The mixins come from the installed
release's source distribution (tests/transformers_tests.py); nothing of them is copied here.

Every test the mixin holds runs unless listed below with its reason. transformers' ConfigTester is not used: it
needs tests/utils/test_configuration_utils.py, which the sdist does not ship (tests/test_configuration.py covers
QMoPConfig).
"""

import copy
import importlib
import unittest
from unittest import mock

import torch
from parameterized import parameterized
from transformers import CLIPTextConfig, CLIPVisionConfig, LlamaConfig

from configuration_qmop import QMoPConfig
from modeling_qmop import QMoPForConditionalGeneration, QMoPModel
from transformers_tests import NOT_IN_SDIST_REASON, load_transformers_tests

_package = load_transformers_tests()
common = importlib.import_module(f"{_package}.test_modeling_common")
ModelTesterMixin, floats_tensor, ids_tensor = common.ModelTesterMixin, common.floats_tensor, common.ids_tensor


class QMoPModelTester:
    """LLaVA's tester shapes (hidden 32, 2 layers, 8-px images of 2-px patches = 16 patches) plus the CLIP text
    encoder that reads the question; the projector compresses the 16 patches to 4 visual tokens."""

    # batch 7: the eager-vs-SDPA tests pad every input to 7 rows with random ids, which would break the
    # one-image-per-prompt pairing of placeholders, pixel_values and queries.
    def __init__(self, parent, batch_size=7, text_seq_length=7, num_visual_tokens=4, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = is_training
        self.vocab_size = 99
        self.pad_token_id = 1
        self.image_token_id = 0  # as LLaVA's tester: inside the vocabulary, never drawn by ids_tensor (+2)
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_visual_tokens = num_visual_tokens
        self.query_length = 5
        self.query_vocab_size = 49
        self.seq_length = text_seq_length + num_visual_tokens
        self.encoder_seq_length = self.seq_length
        self.image_size, self.patch_size = 8, 2

    def get_config(self):
        vision = CLIPVisionConfig(
            image_size=self.image_size, patch_size=self.patch_size, num_channels=3, hidden_size=32, projection_dim=32,
            num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, dropout=0.1, attention_dropout=0.1,
        )
        text_encoder = CLIPTextConfig(
            vocab_size=self.query_vocab_size, hidden_size=32, projection_dim=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=37, max_position_embeddings=77,
            bos_token_id=self.query_vocab_size - 2, eos_token_id=self.query_vocab_size - 1, pad_token_id=1,
        )
        text = LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=37, max_position_embeddings=512,
            pad_token_id=self.pad_token_id, initializer_range=0.02,
        )
        return QMoPConfig(
            vision_config=vision, text_encoder_config=text_encoder, text_config=text,
            num_visual_tokens=self.num_visual_tokens, image_token_id=self.image_token_id,
            router_hidden_size=16, resampler_num_layers=1,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        input_ids[:, : self.num_visual_tokens] = self.image_token_id  # one image per prompt, M placeholders
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        # One question per image, CLIP style: BOS ... EOS (the text encoder pools at the EOS).
        query_input_ids = ids_tensor([self.batch_size, self.query_length], self.query_vocab_size - 3) + 1
        query_input_ids[:, 0] = self.query_vocab_size - 2
        query_input_ids[:, -1] = self.query_vocab_size - 1
        inputs_dict = {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "query_input_ids": query_input_ids,
            "query_attention_mask": torch.ones_like(query_input_ids),
        }
        return config, inputs_dict


class QMoPModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (QMoPModel, QMoPForConditionalGeneration)
    _is_composite = True  # as LLaVA: vision tower, text encoder and LLM carry their own sub-configs
    # The images and their questions travel with `input_ids` wherever the mixin builds inputs of its own.
    additional_model_inputs = ["pixel_values", "query_input_ids", "query_attention_mask"]
    # 4.57's mixin only (5.x removed these features); LLaVA's 4.57 tester sets the same: no head pruning or
    # head masking in a VLM whose towers are separate models.
    test_pruning = False
    test_head_masking = False
    # Not every parameter gets a gradient, by design: the tower layers after `vision_feature_layer` (-2) and its
    # post-layernorm never run (as in LLaVA-1.5), and a branch the router's top-k drops for every image is not run.
    test_all_params_have_gradient = False

    @property
    def all_generative_model_classes(self):
        # The generate() tests live in GenerationTesterMixin, which transformers' sdist does not ship (see
        # NOT_IN_SDIST_REASON); generation is tested in tests/test_generation.py.
        return ()

    def setUp(self):
        self.model_tester = QMoPModelTester(self)
        # The mixin picks labels and base-model handling by transformers' auto-mapping names; a remote-code model is
        # in none of them. Register QMoP's two classes the way LLaVA's are, for this test module only.
        for mapping, class_name in (
            ("MODEL_MAPPING_NAMES", "QMoPModel"),
            ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "QMoPForConditionalGeneration"),
        ):
            patcher = mock.patch.object(common, mapping, {**getattr(common, mapping), "qmop_llava": class_name})
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_mismatching_num_image_tokens(self):
        """As LLaVA's test: fewer images than placeholders is a clear error, two prompts with two images work."""
        config, input_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            inputs = copy.deepcopy(input_dict)
            model(**inputs)
            inputs["pixel_values"] = inputs["pixel_values"][-1:]
            inputs["query_input_ids"] = inputs["query_input_ids"][-1:]
            inputs["query_attention_mask"] = inputs["query_attention_mask"][-1:]
            with self.assertRaisesRegex(ValueError, "Image features and image tokens do not match"):
                model(**inputs)
            two = {k: torch.cat([v[:1], v[:1]]) for k, v in inputs.items()}
            one_image = dict(two, pixel_values=two["pixel_values"][:1], query_input_ids=two["query_input_ids"][:1],
                             query_attention_mask=two["query_attention_mask"][:1])
            with self.assertRaisesRegex(ValueError, "Image features and image tokens do not match"):
                model(**one_image)
            model(**two)

    @parameterized.expand([("linear",), ("dynamic",), ("yarn",)])
    def test_model_rope_scaling_from_config(self, scaling_type):
        self.skipTest(
            "the mixin feeds random text ids over the whole vocabulary, which include the `<image>` placeholder id; "
            "QMoP refuses placeholders without `pixel_values` (tests/test_modeling.py::test_placeholder_image_mismatch). "
            "RoPE scaling is the Llama language model's, tested by transformers"
        )

    def test_generation_tester_mixin_is_not_in_sdist(self):
        self.skipTest(NOT_IN_SDIST_REASON)
