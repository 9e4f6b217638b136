"""LearnPruner's learnable pruner after the vision encoder (`pruning_score="learned"`): the pruning branch keeps the
patches an MLP on the feature layer's output ranks highest; the language-model loss trains it; it composes with
recycling and with QG-VTC tower pruning; generation stays exact in a left-padded batch."""

import pytest
import torch
from conftest import make_image
from test_conversion import _settings as conversion_settings
from test_conversion import sources  # noqa: F401  (the tiny LLaVA + CLIP sources fixture)

from configuration_qmop import QMoPConfig
from qmop_tools.testing.tiny import build_tiny
from modeling_qmop import QMoPForConditionalGeneration
from qmop_tools.bench import flops as F
from qmop_tools.bench.measure import adapter_for, count_prefill_flops
from qmop_tools.bench.models import build_qmop, make_inputs
from qmop_tools.bench.runner import get_preset

PROMPTS = [
    "USER: <image>\nWhat colour is the circle? ASSISTANT:",
    "USER: <image>\nHow many objects are there in the picture? Answer with a single word. ASSISTANT:",
    "USER: <image>\nDescribe it. ASSISTANT:",
]
PRUNING_ONLY = dict(branches=["pruning"], router_top_k=1, pruning_score="learned")


def test_config_round_trip_and_scorer_weights(tmp_path):
    config = QMoPConfig(**PRUNING_ONLY)
    config.save_pretrained(tmp_path)
    assert QMoPConfig.from_pretrained(tmp_path).pruning_score == "learned"
    model, _ = build_tiny(**PRUNING_ONLY)
    names = {name for name, _ in model.named_parameters() if ".scorer." in name}
    prefix = "model.projector.pruning_branch.scorer"
    assert names == {f"{prefix}.linear_1.weight", f"{prefix}.linear_1.bias", f"{prefix}.linear_2.weight"}
    with pytest.raises(ValueError, match="pruning_score"):
        QMoPConfig(pruning_score="learnt")


def test_kept_patches_are_the_scorers_top_k_in_raster_order():
    model, processor = build_tiny(num_visual_tokens=9, seed=2, **PRUNING_ONLY)
    inputs = processor(images=make_image(seed=1), text=PROMPTS[0])
    base = model.model
    with torch.no_grad():
        out = model(**inputs)
        hidden, layer_input, layer = base.get_vision_features(inputs["pixel_values"])
        scores = base.projector.pruning_branch.scorer(hidden[:, 1:])  # (1, P)
    assert torch.allclose(scores.sum(-1), torch.ones(1))
    assert out.kept_patch_indices[0].tolist() == sorted(scores[0].topk(9).indices.tolist())
    with pytest.raises(ValueError, match="pass `patches`"):
        base.pruning_scores(layer_input, layer, None)


def test_the_language_model_loss_trains_the_scorer():
    model, processor = build_tiny(num_visual_tokens=9, **PRUNING_ONLY)
    model.train()
    inputs = processor(images=[make_image(seed=0), make_image(seed=3)], text=PROMPTS[:2])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    model(**inputs, labels=labels).loss.backward()
    scorer = model.model.projector.pruning_branch.scorer
    for parameter in scorer.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def _greedy(model, inputs, n=5):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize(
    "config",
    [dict(PRUNING_ONLY, pruning_recycle=True),
     dict(pruning_score="learned", pruning_recycle=True, tower_pruning_schedule="custom", tower_pruning_layers=[0, 1],
          tower_pruning_keep=[40, 20])],
    ids=["pruning-recycle", "qmop-with-tower-pruning"],
)
def test_left_padded_batch_equals_single_samples(config):
    model, processor = build_tiny(num_visual_tokens=9, seed=1, **config)
    images = [make_image(seed=s, width=30 + 10 * s) for s in range(3)]
    batch = processor(images=images, text=PROMPTS)
    assert (batch["attention_mask"][:, 0] == 0).any()  # really padded
    batched = _greedy(model, batch)
    pad = model.generation_config.pad_token_id
    for i in range(3):
        single = _greedy(model, processor(images=images[i], text=PROMPTS[i]))[0]  # stops at EOS, the batch pads on
        assert torch.equal(batched[i, :len(single)], single) and (batched[i, len(single):] == pad).all(), i


def test_save_and_reload_keep_the_scorer(tmp_path):
    model, processor = build_tiny(num_visual_tokens=9, seed=4, **PRUNING_ONLY)
    inputs = processor(images=make_image(seed=5), text=PROMPTS[2])
    model.save_pretrained(tmp_path)
    reloaded = QMoPForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("recycle", [False, True])
def test_counted_flops_equal_the_analytic_count(recycle):
    preset = get_preset("smoke")
    model = build_qmop(preset.shapes, device="cpu", dtype=torch.float32, pruning_score="learned",
                       pruning_recycle=recycle)
    inputs = make_inputs(model.config, 1, preset.prompt_tokens, 16, preset.query_tokens, "cpu", torch.float32)
    counted = count_prefill_flops(adapter_for(model), inputs)
    analytic = F.qmop_analytic_flops(model.config, 1, preset.prompt_tokens, 16, preset.query_tokens,
                                     branch_images=counted["branch_images"])
    counted_parts, analytic_parts = dict(counted["components"]), analytic.as_dict()
    assert counted_parts.pop("llm") == pytest.approx(analytic_parts.pop("llm"), rel=2e-4)  # 4.57's rotary matmul
    counted_parts.pop("total"), analytic_parts.pop("total")
    assert counted_parts == analytic_parts  # the scorer (and, recycling, the feature layer's attention) to the FLOP
    assert counted["whole_forward"] == counted["components"]["total"]


def test_conversion_initialises_the_scorer(sources):  # noqa: F811
    from transformers import AutoModelForImageTextToText

    from conversion import convert

    settings = conversion_settings(sources, "learned-pruner", num_visual_tokens=4,
                                   config_overrides=dict(pruning_score="learned"))
    report = convert(settings)
    scorer_keys = sorted(k for k in report.fresh_keys if ".pruning_branch.scorer." in k)
    assert len(scorer_keys) == 3, scorer_keys  # freshly initialised, seeded, and reported as such
    model = AutoModelForImageTextToText.from_pretrained(report.output, trust_remote_code=True)
    assert model.config.pruning_score == "learned"
    assert float(model.model.projector.pruning_branch.scorer.linear_1.weight.detach().std()) > 0
