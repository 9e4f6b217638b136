"""LLaVA-1.5 -> QMoP-LLaVA conversion (`qmop convert`, `python -m conversion`).

    settings.py   ConversionSettings / ConversionReport / ConversionError; checks that need no checkpoint
    sources.py    resolving and reading the LLaVA and CLIP checkpoints, configs and tokenizers
    keys.py       the key-renaming rules (one anchored regex per key) and the functions that apply them
    assemble.py   QMoP config and processor; converted tensors; the QMoP model and the LLaVA reference
    verify.py     LLaVA parity, the requested model's forward and generation, the reload check
    card.py       the model card (README.md) and the command that reproduces a conversion
    hub.py        pushing the finished folder
    converter.py  convert(settings): all of the above in order, with step lines and progress bars (stderr),
                  staged in a temporary folder and moved into place
    cli.py        the command line (`build_parser`, `main`)

Library use:

    from conversion import ConversionSettings, convert
    report = convert(ConversionSettings(llava="llava-hf/llava-1.5-7b-hf", clip="openai/clip-vit-large-patch14-336",
                                        output="qmop-7b", num_visual_tokens=144, dtype="float16"))
"""

from conversion.converter import convert
from conversion.settings import DEFAULT_ATOL, DTYPES, ConversionError, ConversionReport, ConversionSettings

__all__ = ["DEFAULT_ATOL", "DTYPES", "ConversionError", "ConversionReport", "ConversionSettings", "convert"]
