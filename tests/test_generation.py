import torch
from conftest import make_image

PROMPTS = [
    "USER: <image>\nWhat colour is the circle? ASSISTANT:",
    "USER: <image>\nHow many objects are there in the picture? Answer with a single word. ASSISTANT:",
    "USER: <image>\nDescribe it. ASSISTANT:",
]


def _greedy(model, inputs, n=6, **kwargs):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


def _count_calls(model):
    counts = {"vision_tower": 0, "text_encoder": 0, "projector": 0, "lm_lengths": []}
    handles = []
    for name in ("vision_tower", "text_encoder", "projector"):
        module = getattr(model.model, name)
        target = module.embeddings if name == "vision_tower" else module
        handles.append(target.register_forward_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1)))
    handles.append(
        model.model.language_model.register_forward_hook(
            lambda module, args, kwargs, out: counts["lm_lengths"].append(kwargs["inputs_embeds"].shape[1]),
            with_kwargs=True,
        )
    )
    return counts, handles


def test_kv_cache_encodes_images_once(tiny):
    model, processor = tiny
    inputs = processor(images=make_image(seed=1), text=PROMPTS[0])
    counts, handles = _count_calls(model)
    cached = _greedy(model, inputs)
    for handle in handles:
        handle.remove()
    assert counts["vision_tower"] == counts["text_encoder"] == counts["projector"] == 1
    assert counts["lm_lengths"][0] == inputs["input_ids"].shape[1] and set(counts["lm_lengths"][1:]) == {1}
    uncached = _greedy(model, inputs, use_cache=False)
    assert torch.equal(cached, uncached)


def test_left_padded_batch_equals_single_samples(tiny):
    model, processor = tiny
    images = [make_image(seed=s, width=30 + 10 * s) for s in range(3)]
    batch = processor(images=images, text=PROMPTS)
    assert (batch["attention_mask"][:, 0] == 0).any()  # really padded
    batched = _greedy(model, batch)
    for i in range(3):
        single = _greedy(model, processor(images=images[i], text=PROMPTS[i]))
        assert torch.equal(batched[i], single[0]), i


def test_several_images_per_prompt(tiny):
    model, processor = tiny
    a, b = make_image(seed=1), make_image(seed=2)
    prompt = "USER: <image>\n<image>\nWhich image is brighter? ASSISTANT:"
    inputs = processor(images=[[a, b]], text=[prompt])
    assert inputs["pixel_values"].shape[0] == 2 and inputs["query_input_ids"].shape[0] == 2
    with torch.no_grad():
        out = model(**inputs)
    assert out.image_hidden_states.shape[0] == 2 and out.router_weights.shape[0] == 2
    swapped = processor(images=[[b, a]], text=[prompt])
    with torch.no_grad():
        out_swapped = model(**swapped)
    assert torch.allclose(out.image_hidden_states[0], out_swapped.image_hidden_states[1], atol=1e-5)
    assert _greedy(model, inputs).shape == (1, 6)


def test_mixed_batch_of_one_and_two_images(tiny):
    model, processor = tiny
    a, b, c = (make_image(seed=s) for s in range(3))
    batch = processor(images=[[a], [b, c]], text=[PROMPTS[0], "USER: <image> <image>\nCompare. ASSISTANT:"])
    batched = _greedy(model, batch)
    single = _greedy(model, processor(images=[[b, c]], text=["USER: <image> <image>\nCompare. ASSISTANT:"]))
    assert torch.equal(batched[1], single[0])


def test_multi_turn_prompt(tiny):
    model, processor = tiny
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "And the square?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.count("<image>") == 1 and prompt.endswith("ASSISTANT:")
    inputs = processor(images=make_image(), text=prompt)
    query = processor.query_tokenizer.decode(inputs["query_input_ids"][0], skip_special_tokens=True)
    assert query.strip() == "what colour is the circle?"  # the turn that holds the image
    assert _greedy(model, inputs).shape == (1, 6)


def test_continuing_from_past_key_values(tiny):
    model, processor = tiny
    inputs = processor(images=make_image(), text=PROMPTS[0])
    with torch.no_grad():
        first = model(**inputs, use_cache=True)
        next_token = first.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], dim=1)
        step = model(input_ids=next_token, attention_mask=mask, past_key_values=first.past_key_values, use_cache=True)
        full_ids = torch.cat([inputs["input_ids"], next_token], dim=1)
        full = model(**{**inputs, "input_ids": full_ids, "attention_mask": mask})
    assert step.router_weights is None  # no image work on a decode step
    assert torch.allclose(step.logits[:, -1], full.logits[:, -1], atol=1e-4)
