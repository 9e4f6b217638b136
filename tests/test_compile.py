"""Static cache + torch.compile: the decode step compiles as one full graph (no graph break, no host sync) and
generates the same tokens as eager. Dynamo's "eager" backend keeps these CPU tests quick; the test with inductor (the
default backend, which compiles C++ on CPU for about a minute) is marked slow."""

import pytest
import torch
from conftest import make_image
from transformers import CompileConfig

from modeling_qmop import QMoPForConditionalGeneration

PROMPTS = [
    "USER: <image>\nWhat colour is the circle? ASSISTANT:",
    "USER: <image>\nHow many objects are there in the picture? Answer with a single word. ASSISTANT:",
]


def _compile_config(backend):
    config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    # generate() compiles only on accelerators unless told otherwise; transformers' own tests set the same flag.
    config._compile_all_devices = True
    return config


def _generate(model, inputs, **kwargs):
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static", **kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("batch", [1, 2])
def test_static_cache_fullgraph_decode_matches_eager(tiny, batch):
    model, processor = tiny
    assert QMoPForConditionalGeneration._can_compile_fullgraph
    images = [make_image(seed=s, width=30 + 10 * s) for s in range(batch)]
    inputs = processor(images=images, text=PROMPTS[:batch])
    eager = _generate(model, inputs)

    graphs = []

    def counting_backend(graph_module, example_inputs):  # dynamo hands over one graph per (re)compilation
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = _generate(model, inputs, compile_config=_compile_config(counting_backend))
    assert graphs, "generate() did not compile the decode step"
    assert torch.equal(compiled, eager)
    # Only the decode steps are compiled: the graphs hold the language model, never the vision side.
    code = "\n".join(graph.code for graph in graphs)
    assert "language_model" in code and "vision_tower" not in code and "projector" not in code


def test_decode_step_explains_without_graph_break(tiny):
    model, processor = tiny
    inputs = processor(images=make_image(seed=3), text=PROMPTS[0])
    with torch.no_grad():
        first = model(**inputs, use_cache=True)
        token = first.logits[:, -1:].argmax(-1)  # (1, 1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        step = dict(input_ids=token, attention_mask=mask, past_key_values=first.past_key_values, use_cache=True)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.forward)(**step)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_static_cache_inductor_decode_matches_eager(tiny):
    model, processor = tiny
    inputs = processor(images=make_image(seed=1), text=PROMPTS[0])
    eager = _generate(model, inputs)
    torch._dynamo.reset()
    assert torch.equal(_generate(model, inputs, compile_config=_compile_config("inductor")), eager)
