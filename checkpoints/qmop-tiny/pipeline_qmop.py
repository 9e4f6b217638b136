# Copyright 2026 The QMoP-LLaVA authors. Licensed under the Apache License, Version 2.0.
"""`pipeline("image-to-text", model=..., trust_remote_code=True)` for QMoP-LLaVA.

transformers 5.x removed the built-in image-to-text task and 4.57's cannot use a multi-tokenizer processor, so
every QMoP checkpoint ships this file and registers it under `custom_pipelines` in config.json. An image alone
is captioned (empty query, the processor's caption prompt); a prompt may still be given.
"""

from transformers import ImageTextToTextPipeline


class QMoPImageToTextPipeline(ImageTextToTextPipeline):
    def __call__(self, images=None, text=None, **kwargs):
        if text is None:
            text = kwargs.pop("prompt", None)
        if images is not None and text is None:
            text = [""] * len(images) if isinstance(images, (list, tuple)) else ""
        kwargs.setdefault("return_full_text", False)
        return super().__call__(images=images, text=text, **kwargs)


__all__ = ["QMoPImageToTextPipeline"]
