"""transformers' own common processor tests (ProcessorTesterMixin) against QMoPProcessor, with the tiny components of
qmop_tools/testing/tiny.py. The mixin comes from the installed release's source distribution (tests/transformers_tests.py).

Every test the mixin holds runs unless listed below with its reason.
"""

import importlib
import os
import shutil
import tempfile
import unittest

from transformers import AutoImageProcessor, AutoTokenizer

from qmop_tools.testing.tiny import build_processor
from processing_qmop import QUERY_TOKENIZER_SUBFOLDER, QMoPProcessor
from transformers_tests import load_transformers_tests

common = importlib.import_module(f"{load_transformers_tests()}.test_processing_common")

NEEDS_HUB_MEDIA = (
    "the test downloads its images from the Hub through transformers' utils/fetch_hub_objects_for_ci.py, which the "
    "sdist does not ship (and CI has no Hub access); the same chat-template path runs with local images in "
    "tests/test_processing.py"
)


class QMoPProcessorTest(common.ProcessorTesterMixin, unittest.TestCase):
    processor_class = QMoPProcessor

    # 5.x's mixin builds the processor from these hooks (setUpClass); 4.57's from `get_component` (setUp below).
    @classmethod
    def _setup_image_processor(cls):
        return build_processor().image_processor

    @classmethod
    def _setup_tokenizer(cls):
        return build_processor().tokenizer

    @classmethod
    def _setup_query_tokenizer(cls):
        return build_processor().query_tokenizer

    @staticmethod
    def prepare_processor_dict():
        return {"num_visual_tokens": 16, "patch_size": 6}

    def setUp(self):
        if getattr(self, "tmpdirname", None) is None:  # 4.57's mixin leaves the saved processor to the test class
            self.tmpdirname = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, self.tmpdirname, True)
            build_processor(**self.prepare_processor_dict()).save_pretrained(self.tmpdirname)

    def get_component(self, attribute, **kwargs):
        # The CLIP tokenizer of the query lives in `query_tokenizer/` (ProcessorMixin's layout for a second tokenizer).
        if attribute == "image_processor":
            return AutoImageProcessor.from_pretrained(self.tmpdirname, **kwargs)
        folder = os.path.join(self.tmpdirname, QUERY_TOKENIZER_SUBFOLDER) if attribute == "query_tokenizer" else self.tmpdirname
        return AutoTokenizer.from_pretrained(folder, **kwargs)

    def test_apply_chat_template_image_0(self):
        self.skipTest(NEEDS_HUB_MEDIA)

    def test_apply_chat_template_image_1(self):
        self.skipTest(NEEDS_HUB_MEDIA)
