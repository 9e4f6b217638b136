import math

import pytest
import torch

from qmop_tools.testing.tiny import build_tiny
from modeling_qmop import QMoPForConditionalGeneration, pool_patch_grid, router_temperature_at

PROMPT = "USER: <image>\nWhat colour is the circle? ASSISTANT:"


def _inputs(processor, image, **kwargs):
    return processor(images=image, text=PROMPT, **kwargs)


def test_forward_outputs(tiny, image):
    model, processor = tiny
    inputs = processor(images=[image, image], text=[PROMPT, "USER: <image>\nHow many? ASSISTANT:"])
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert out.image_hidden_states.shape == (2, 16, 32)  # M tokens per image, not 3M
    assert out.router_weights.shape == (2, 3) and out.router_probs.shape == (2, 3)
    assert torch.allclose(out.router_weights.sum(-1), torch.ones(2))
    assert ((out.router_weights > 0).sum(-1) == 2).all()  # top-2 of 3
    assert out.kept_patch_indices.shape == (2, 16)
    assert out.aux_loss.ndim == 0 and out.aux_loss > 0


def test_pooling_is_identity_at_full_budget():
    patches = torch.randn(2, 64, 5)  # (N, P, C)
    assert torch.equal(pool_patch_grid(patches, 8), patches)
    pooled = pool_patch_grid(patches, 4)
    grid = patches.view(2, 8, 8, 5)
    assert torch.allclose(pooled[:, 0], grid[:, :2, :2].mean(dim=(1, 2)), atol=1e-6)


def test_pruning_keeps_top_cls_attention_patches_in_raster_order(image):
    model, processor = build_tiny(num_visual_tokens=16, branches=["pruning"], router_top_k=1)
    inputs = _inputs(processor, image)
    with torch.no_grad():
        out = model(**inputs)
        hidden, layer_input, layer = model.model.get_vision_features(inputs["pixel_values"])
        # reference: CLS->patch attention of the feature layer from the eager attention of that layer
        attention = layer.self_attn
        normed = layer.layer_norm1(layer_input)
        q = attention.q_proj(normed).view(1, 65, 4, 8).transpose(1, 2)
        k = attention.k_proj(normed).view(1, 65, 4, 8).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1).mean(1)  # (1, S, S)
        expected = probs[0, 0, 1:].topk(16).indices.sort().values
    kept = out.kept_patch_indices[0]
    assert torch.equal(kept, expected)
    assert torch.all(kept[1:] > kept[:-1])
    assert torch.equal(out.router_weights, torch.ones(1, 1))


def test_pruning_indices_equal_under_sdpa_and_eager(image, tmp_path):
    model, processor = build_tiny(num_visual_tokens=9, branches=["pruning"], router_top_k=1)
    model.save_pretrained(tmp_path)
    inputs = _inputs(processor, image, num_visual_tokens=9)
    kept = {}
    for implementation in ("sdpa", "eager"):
        loaded = QMoPForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert loaded.model.vision_tower.config._attn_implementation == implementation
        with torch.no_grad():
            kept[implementation] = loaded(**inputs).kept_patch_indices
    assert torch.equal(kept["sdpa"], kept["eager"])


def test_question_relevance_pruning_and_recycling_train(image):
    model, processor = build_tiny(
        num_visual_tokens=16, branches=["pruning"], router_top_k=1, pruning_score="question_relevance", pruning_recycle=True
    )
    model.train()
    inputs = _inputs(processor, image)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grad = model.model.projector.pruning_branch.question_proj.linear_1.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the straight-through score trains the question MLP
    other = processor(images=image, text="USER: <image>\nIs there a dog under the tree? ASSISTANT:")
    model.eval()
    with torch.no_grad():
        a = model(**inputs).kept_patch_indices
        b = model(**other).kept_patch_indices
    assert a.shape == b.shape == (1, 16)


def test_random_k_pruning_keeps_m_random_patches_in_raster_order(image):
    model, processor = build_tiny(num_visual_tokens=16, branches=["pruning"], pruning_score="random")
    inputs = _inputs(processor, image)
    torch.manual_seed(0)
    with torch.no_grad():
        first = model(**inputs).kept_patch_indices
        second = model(**inputs).kept_patch_indices
    assert first.shape == (1, 16) and len(set(first[0].tolist())) == 16
    assert torch.equal(first, first.sort(dim=-1).values)  # raster order
    assert not torch.equal(first, second)  # drawn again on every call


def test_router_eval_is_deterministic_and_training_is_noisy(image):
    model, processor = build_tiny(num_visual_tokens=16)
    inputs = _inputs(processor, image)
    with torch.no_grad():
        first = model(**inputs).router_probs
        second = model(**inputs).router_probs
    assert torch.equal(first, second)
    model.train()
    model.set_router_temperature(1.0)
    torch.manual_seed(0)
    with torch.no_grad():
        noisy = torch.stack([model(**inputs).router_probs for _ in range(4)])
    assert not torch.allclose(noisy[0], noisy[1])  # Gumbel noise in training


def test_router_temperature_schedule():
    from configuration_qmop import QMoPConfig

    config = QMoPConfig()
    assert router_temperature_at(config, 0.0) == pytest.approx(1.0)
    assert router_temperature_at(config, 1.0) == pytest.approx(0.1)
    assert router_temperature_at(config, 0.5) == pytest.approx(0.55)
    values = [router_temperature_at(config, p / 10) for p in range(11)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_only_selected_branches_run(image):
    # The routed path (CPU, training, batches above `projector_dense_max_images`): a branch runs only where selected.
    model, processor = build_tiny(num_visual_tokens=16, router_top_k=1)
    calls = {"pooling": 0, "resampler": 0, "pruning": 0}
    for name in calls:
        branch = getattr(model.model.projector, f"{name}_branch")
        branch.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    with torch.no_grad():
        out = model(**_inputs(processor, image))
    chosen = model.config.branches[int(out.router_weights[0].argmax())]
    assert calls == {name: int(name == chosen) for name in calls}
    if chosen != "pruning":
        assert (out.kept_patch_indices == -1).all()


QUESTIONS = ["What colour is the circle?", "How many objects are there?", "Describe it.", "Is it a dog?"]


def _projector_inputs(model, inputs, num_tokens=16):
    """What `get_image_features` hands the projector: patches, CLS, question, budget, pruning scores, attention."""
    base = model.model
    with torch.no_grad():
        hidden, layer_input, layer = base.get_vision_features(inputs["pixel_values"])
        query = None
        if model.config.uses_query:
            query = base.get_query_embeds(inputs["query_input_ids"], inputs["query_attention_mask"])
        scores = attention = None
        if "pruning" in model.config.branches:
            scores, attention = base.pruning_scores(layer_input, layer, query)
    return hidden[:, 1:], hidden[:, 0], query, num_tokens, scores, attention


@pytest.mark.parametrize(
    "config",
    [dict(router_mode="query", router_top_k=k) for k in (1, 2, 3)]
    + [dict(router_mode="vision", router_top_k=k) for k in (1, 2)]
    + [dict(router_mode="uniform"), dict(branches=["pooling", "pruning"], router_top_k=1),
       dict(branches=["resampler"]), dict(router_top_k=1, pruning_score="question_relevance", pruning_recycle=True)],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_dense_projector_equals_routed(config):
    """The dense path (every branch on every image, masked by the router's weights) gives the routed outputs."""
    from conftest import make_image

    model, processor = build_tiny(num_visual_tokens=16, seed=3, router_eval_temperature=1.0, **config)
    images = [make_image(seed=s, width=30 + 7 * s) for s in range(4)]
    inputs = processor(images=images, text=[f"USER: <image>\n{q} ASSISTANT:" for q in QUESTIONS])
    args = _projector_inputs(model, inputs)
    with torch.no_grad():
        routed = model.model.projector(*args, dense=False)
        dense = model.model.projector(*args, dense=True)
    weights = routed.router_weights
    if model.config.uses_router and model.config.router_top_k < len(model.config.branches):
        assert (weights == 0).any()  # some branch is really masked out for some image
    assert torch.equal(dense.router_weights, weights)
    torch.testing.assert_close(dense.image_features, routed.image_features, rtol=1e-5, atol=1e-6)
    if routed.kept_patch_indices is None:
        assert dense.kept_patch_indices is None
    else:
        assert torch.equal(dense.kept_patch_indices, routed.kept_patch_indices)


def test_dense_path_rule():
    model, _ = build_tiny(num_visual_tokens=16, projector_dense_max_images=2)
    projector, cuda, cpu = model.model.projector, torch.device("cuda"), torch.device("cpu")
    assert projector.uses_dense_path(1, cuda) and projector.uses_dense_path(2, cuda)
    assert not projector.uses_dense_path(3, cuda)  # larger batches: each branch on its own images
    assert not projector.uses_dense_path(1, cpu)  # nothing to wait for on a CPU
    model.train()
    assert not projector.uses_dense_path(1, cuda)  # training runs each branch on its own images only
    model.eval()
    with pytest.raises(ValueError, match="projector_dense_max_images"):
        build_tiny(num_visual_tokens=16, projector_dense_max_images=-1)


def test_dense_projector_compiles_as_one_graph(tiny, image):
    """No data-dependent shape or host sync: dynamo captures the whole projector (it takes the dense path when
    compiled), and the result is the eager one."""
    model, processor = tiny
    projector = model.model.projector
    inputs = processor(images=[image, image], text=[PROMPT, "USER: <image>\nHow many? ASSISTANT:"])
    args = _projector_inputs(model, inputs)
    with torch.no_grad():
        eager = projector(*args)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(projector)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(projector, fullgraph=True, backend="eager")(*args)
    torch.testing.assert_close(compiled.image_features, eager.image_features)
    assert torch.equal(compiled.kept_patch_indices, eager.kept_patch_indices)


def test_uniform_fusion_and_single_branch(image):
    model, processor = build_tiny(num_visual_tokens=16, router_mode="uniform")
    assert model.model.projector.router is None
    with torch.no_grad():
        out = model(**_inputs(processor, image))
    assert torch.allclose(out.router_weights, torch.full((1, 3), 1 / 3))
    single, processor = build_tiny(num_visual_tokens=16, branches=["resampler"], router_top_k=1)
    with torch.no_grad():
        out = single(**processor(images=image, text=PROMPT))  # the query is not needed without a router
        out_without_query = single(
            **{k: v for k, v in processor(images=image, text=PROMPT).items() if not k.startswith("query")}
        )
    assert torch.equal(out.logits, out_without_query.logits)


def test_vision_tower_stops_at_feature_layer(tiny, image):
    model, processor = tiny
    layers = model.model.vision_tower.encoder.layers
    ran = []
    handles = [layer.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(**_inputs(processor, image))
    for handle in handles:
        handle.remove()
    assert ran == [0, 1]  # 3 layers, feature layer -2: the last layer never runs


def test_budget_follows_placeholders(tiny, image):
    model, processor = tiny
    for budget in (4, 16, 64):
        with torch.no_grad():
            out = model(**_inputs(processor, image, num_visual_tokens=budget))
        assert out.image_hidden_states.shape[1] == budget


def test_labels_add_the_router_losses(image):
    model, processor = build_tiny(num_visual_tokens=16, router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    inputs = _inputs(processor, image)
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        targets = labels[:, 1:].masked_fill(labels[:, 1:] == model.config.image_token_id, -100).reshape(-1)
        lm_loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    assert out.router_z_loss == pytest.approx(float(torch.logsumexp(out.router_logits, -1).pow(2).mean()), rel=1e-5)
    assert out.loss == pytest.approx(float(lm_loss + 0.5 * out.aux_loss + 0.25 * out.router_z_loss), rel=1e-5)


def test_router_eval_temperature_and_logit_cap(image):
    model, processor = build_tiny(num_visual_tokens=16, router_eval_temperature=0.7, router_logit_cap=0.5)
    inputs = _inputs(processor, image)
    with torch.no_grad():
        out = model(**inputs)
    assert out.router_logits.abs().max() < 0.5  # capped: 0.5 * tanh(.)
    assert torch.allclose(out.router_probs, torch.softmax(out.router_logits / 0.7, dim=-1))
    # Unset, the eval temperature is the annealing floor (checkpoints written before the field behave as before).
    plain, _ = build_tiny(num_visual_tokens=16)
    assert plain.config.router_inference_temperature == plain.config.router_min_temperature
    with torch.no_grad():
        out = plain(**inputs)
    assert torch.allclose(out.router_probs, torch.softmax(out.router_logits / 0.1, dim=-1))


def test_normalized_logit_cap_keeps_a_gradient_where_tanh_saturates():
    """Raw router logits far past the cap: tanh pins them at +-cap with no gradient left; "normalize" keeps them
    centred with root mean square = cap, and still passes a gradient to the router's weights."""
    grads = {}
    for mode in ("tanh", "normalize"):
        model, _ = build_tiny(num_visual_tokens=16, router_logit_cap=1.0, router_logit_cap_mode=mode)
        router = model.model.projector.router
        with torch.no_grad():
            router.linear_2.bias.copy_(torch.tensor([40.0, -40.0, -40.0]))  # far past the cap
        cls_token, query = torch.randn(4, router.vision_norm.normalized_shape[0]), torch.randn(4, 32)
        logits = router.logits(cls_token, query)  # (4, 3)
        if mode == "normalize":
            torch.testing.assert_close(logits.mean(-1), torch.zeros(4), atol=1e-6, rtol=0)
            torch.testing.assert_close(logits.pow(2).mean(-1).sqrt(), torch.ones(4))
        (logits * torch.tensor([[1.0, -2.0, 3.0]])).sum().backward()
        grads[mode] = router.linear_1.weight.grad.abs().sum()
    assert grads["tanh"] < 1e-6 < grads["normalize"]
    with pytest.raises(ValueError, match="router_logit_cap_mode"):
        build_tiny(num_visual_tokens=16, router_logit_cap=1.0, router_logit_cap_mode="clip")


def test_uniform_router_warmup_runs_every_branch_with_equal_weight(image):
    model, processor = build_tiny(num_visual_tokens=16)
    inputs = _inputs(processor, image)
    model.set_router_uniform(True)
    for mode in (model.train, model.eval):
        mode()
        out = model(**inputs)
        assert torch.equal(out.router_weights, torch.full((1, 3), 1 / 3))
        assert (out.kept_patch_indices >= 0).all()  # the pruning branch ran
    model.set_router_uniform(False)
    assert (model(**inputs).router_weights == 0).sum() == 1  # top-2 of 3 again


def test_training_step_reaches_router_and_all_selected_branches(image):
    model, processor = build_tiny(num_visual_tokens=16, router_top_k=3)
    model.train()
    inputs = _inputs(processor, image)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    projector = model.model.projector
    for module in (projector.router.linear_1, projector.pooling_branch.expert.linear_1,
                   projector.resampler_branch.expert.linear_1, projector.pruning_branch.expert.linear_1):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ bad input
def test_placeholder_image_mismatch(tiny, image):
    model, processor = tiny
    inputs = _inputs(processor, image)
    two_images = torch.cat([inputs["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="do not match|perfect square"):
        model(**{**inputs, "pixel_values": two_images, "query_input_ids": inputs["query_input_ids"].repeat(2, 1),
                 "query_attention_mask": inputs["query_attention_mask"].repeat(2, 1)})
    no_placeholders = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.image_token_id, 5)
    with pytest.raises(ValueError, match="no `<image>` placeholder"):
        model(**{**inputs, "input_ids": no_placeholders})
    with pytest.raises(ValueError, match="no `pixel_values`"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == processor.image_token_id).nonzero()[0]] = 5  # 15 placeholders: not a square
    with pytest.raises(ValueError, match="perfect square"):
        model(**{**inputs, "input_ids": ids})


def test_pixel_values_without_query(tiny, image):
    model, processor = tiny
    inputs = _inputs(processor, image)
    with pytest.raises(ValueError, match="query_input_ids"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="one query row per image"):
        model(**{**inputs, "query_input_ids": inputs["query_input_ids"].repeat(2, 1)})


def test_wrong_dtypes(tiny, image):
    model, processor = tiny
    inputs = _inputs(processor, image)
    with pytest.raises(TypeError, match="pixel_values"):
        model(**{**inputs, "pixel_values": (inputs["pixel_values"] * 50).to(torch.uint8)})
    with pytest.raises(TypeError, match="input_ids"):
        model(**{**inputs, "input_ids": inputs["input_ids"].float()})
    with pytest.raises(ValueError, match="pixel_values"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][0]})
    with torch.no_grad():  # float64 / bfloat16 pixels are cast to the tower's dtype
        a = model(**{**inputs, "pixel_values": inputs["pixel_values"].double()}).logits
        b = model(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_bfloat16_model_runs(image):
    model, processor = build_tiny(num_visual_tokens=16)
    model = model.to(torch.bfloat16)
    inputs = _inputs(processor, image)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_qwen2_language_model(image):
    from qmop_tools.testing.tiny import build_config, build_model, build_processor

    processor = build_processor(num_visual_tokens=16)
    config = build_config(processor)
    text = config.text_config.to_dict()
    text.update(model_type="qwen2")
    config = type(config)(**{**config.to_dict(), "text_config": text})
    model = build_model(config)
    assert type(model.model.language_model).__name__ == "Qwen2Model"
    with torch.no_grad():
        assert model(**_inputs(processor, image)).logits.shape[-1] == config.text_config.vocab_size


def test_class_contract():
    assert QMoPForConditionalGeneration.config_class.model_type == "qmop_llava"
    assert "QMoPProjector" in QMoPForConditionalGeneration._no_split_modules
