"""lmms-eval integration: the `qmop` model entry (`model.py`) and the local mini VTCBench task (`task.py`).

lmms-eval finds the model through the entry point that setup.py declares in the group `lmms_eval.models`
(`pip install -e ".[lmms]"`); `manifest` is what that entry point loads. README, "Evaluating with lmms-eval", says
why QMoP has its own entry rather than lmms-eval's `llava_hf` or `huggingface` ones.
"""


def manifest():
    """The lmms-eval model manifest: `--model qmop` resolves to the chat-style class in `model.py`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="qmop", chat_class_path="qmop_tools.lmms.model.QMoPLMMs")
