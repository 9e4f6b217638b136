"""Efficiency benchmark: QMoP-LLaVA vs transformers' LLaVA-1.5 (FLOPs, KV cache, TTFT, decode, memory)."""

from .runner import BenchSettings, run_benchmark
from .report import markdown_report, write_outputs

__all__ = ["BenchSettings", "run_benchmark", "markdown_report", "write_outputs"]
