"""Decode speed as `generate` delivers it: eager vs `torch.compile`, both with a static cache.

`generate(..., cache_implementation="static")` runs the prefill eagerly; with a `compile_config` it compiles the
decode step (the model's forward on one new token per sequence) once and reuses the graph. A streamer timestamps
every new token: the decode time is from the first generated token (the end of the prefill) to the last, so the
prefill, the image work and the compilation itself are never in it. The first compiled run (warm-up) pays for the
compilation; its wall time is reported apart.
"""

import time
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import CompileConfig
from transformers.generation import BaseStreamer

from .measure import ModelAdapter, median, synchronize
from .models import BenchInputs

MODES = ("eager", "compiled")


class _TokenClock(BaseStreamer):
    """Time of every `put`: generate puts the prompt first, then each new token (after the device finished it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times = []

    def put(self, value):
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass


@dataclass
class GenerateDecode:
    decode_s: float  # from the first generated token to the last
    decode_steps: int  # tokens generated after the first, per sequence
    wall_s: float  # the whole generate call (prefill, and compilation on the first compiled call, included)


def compile_config(backend: str, device: torch.device) -> CompileConfig:
    config = CompileConfig(fullgraph=True, backend=backend)
    if device.type == "cpu":
        # generate() compiles only on accelerators by default; this opt-in flag (transformers' own generation tests
        # set it) lets the CPU preset measure compilation too.
        config._compile_all_devices = True
    return config


def generate_inputs(adapter: ModelAdapter, inputs: BenchInputs) -> dict:
    out = dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
               attention_mask=torch.ones_like(inputs.input_ids))
    if adapter.kind == "qmop" and inputs.query_input_ids is not None:
        out["query_input_ids"] = inputs.query_input_ids
    return out


@torch.inference_mode()
def generate_decode(adapter: ModelAdapter, inputs: BenchInputs, decode_tokens: int,
                    compile_with: Optional[CompileConfig]) -> GenerateDecode:
    """Greedy `generate` of `decode_tokens + 1` tokens with a static cache (the `<image>` id suppressed, no early
    stop), compiled when `compile_with` is given."""
    clock = _TokenClock(adapter.device)
    new_tokens = decode_tokens + 1
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static", suppress_tokens=[adapter.config.image_token_id], streamer=clock,
                  pad_token_id=0)
    if compile_with is not None:
        kwargs["compile_config"] = compile_with
    else:
        kwargs["disable_compile"] = True
    synchronize(adapter.device)
    start = time.perf_counter()
    adapter.model.generate(**generate_inputs(adapter, inputs), **kwargs)
    synchronize(adapter.device)
    wall = time.perf_counter() - start
    token_times = clock.times[1:]  # without the prompt
    return GenerateDecode(token_times[-1] - token_times[0], len(token_times) - 1, wall)


def measure_generate_decode(adapters: dict, inputs: dict, batch_size: int, decode_tokens: int, warmup: int,
                            repeats: int, backend: str, device: torch.device) -> dict:
    """{variant name: {mode: {tokens_per_s, all, first_call_s}}}; eager and compiled runs are interleaved."""
    config = compile_config(backend, device)
    runs = {name: {mode: [] for mode in MODES} for name in adapters}
    first_call = {}
    for repeat in range(max(1, warmup) + repeats):  # the first compiled call compiles: always one warm-up
        for name, adapter in adapters.items():
            for mode in MODES:
                result = generate_decode(adapter, inputs[name], decode_tokens, config if mode == "compiled" else None)
                if repeat == 0:
                    first_call[(name, mode)] = result.wall_s
                elif repeat >= max(1, warmup):
                    runs[name][mode].append(batch_size * result.decode_steps / result.decode_s)
    return {
        name: {mode: dict(tokens_per_s=median(values), all=values, first_call_s=first_call[(name, mode)])
               for mode, values in modes.items()}
        for name, modes in runs.items()
    }
