"""Tiny QMoP-LLaVA models and tokenizers built locally in seconds (nothing downloaded): what the tests, the demo's
fallback, the benchmarks' presets and the mini VTCBench build on (`tiny.py`; `qmop tiny` writes one)."""
