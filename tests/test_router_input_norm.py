"""router_input_norm="standardize": the router's inputs standardised by running statistics of the training inputs."""

import pytest
import torch
import torch.nn.functional as F

from conftest import make_image
from qmop_tools.testing.tiny import build_tiny
from modeling_qmop import QMoPRunningStandardize

STANDARDIZE = {"router_input_norm": "standardize"}
OUTCOME_ALL = {"router_training": "outcome", "router_outcome_branches": "all", "router_eval_temperature": 1.0}
PROMPTS = ["USER: <image>\nWhat letter is on the tag? ASSISTANT: f", "USER: <image>\nIs it at the top? ASSISTANT: no"]


def _batch(processor, n=2):
    images = [make_image(seed=s) for s in range(n)]
    inputs = processor(images=images, text=[PROMPTS[i % 2] for i in range(n)])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs, labels


def _router_inputs(model, inputs):
    """[LN(v); LN(t)] as the router computes it, captured from its first linear layer's input."""
    captured = []
    router = model.model.projector.router
    handle = router.standardize.register_forward_hook(lambda module, args, out: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured[0]


def test_config_checks_and_default():
    model, _ = build_tiny(num_visual_tokens=16)
    assert model.config.router_input_norm == "layer" and model.model.projector.router.standardize is None
    with pytest.raises(ValueError, match="router_input_norm"):
        build_tiny(num_visual_tokens=16, router_input_norm="batch")
    for momentum in (0.0, 1.5):
        with pytest.raises(ValueError, match="router_input_norm_momentum"):
            build_tiny(num_visual_tokens=16, router_input_norm_momentum=momentum, **STANDARDIZE)
    with pytest.raises(TypeError, match="router_input_norm_momentum"):
        build_tiny(num_visual_tokens=16, router_input_norm_momentum="0.1", **STANDARDIZE)


def test_running_statistics_average_then_decay():
    norm = QMoPRunningStandardize(3, momentum=0.25)
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 6.0, 3.0]])
    torch.testing.assert_close(norm(x), x / (1 + norm.eps) ** 0.5, rtol=0, atol=0)  # before any update: ~identity
    norm(x, update=True)
    torch.testing.assert_close(norm.running_mean, torch.tensor([2.0, 4.0, 3.0]))
    torch.testing.assert_close(norm.running_var, torch.tensor([1.0, 4.0, 0.0]))
    torch.testing.assert_close(norm(x), (x - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps))
    y = torch.tensor([[5.0, 0.0, 3.0]])  # one sample: a batch of one updates too
    norm(y, update=True)  # second update: rate max(0.25, 1/2) = 1/2
    torch.testing.assert_close(norm.running_mean, torch.tensor([3.5, 2.0, 3.0]))
    torch.testing.assert_close(norm.running_var, torch.tensor([0.5 * 1.0 + 0.5 * 2.25, 0.5 * 4.0 + 0.5 * 4.0, 0.0]))
    for _ in range(3):
        norm(y, update=True)  # from the fourth update on, the rate is the momentum
    assert float(norm.num_updates) == 5
    before = norm.running_mean.clone()
    norm(y, update=True)
    torch.testing.assert_close(norm.running_mean, before + 0.25 * (y[0] - before))


def test_untrained_standardized_router_equals_the_layer_norm_router():
    """Fresh statistics are the identity: the same weights give the same logits as router_input_norm='layer'."""
    plain, processor = build_tiny(num_visual_tokens=16)
    standardized, _ = build_tiny(num_visual_tokens=16, **STANDARDIZE)
    missing, unexpected = standardized.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == [f"model.projector.router.standardize.{n}" for n in ("num_updates", "running_mean",
                                                                                  "running_var")]
    assert not unexpected
    inputs, _ = _batch(processor)
    with torch.no_grad():
        torch.testing.assert_close(standardized(**inputs).router_logits, plain(**inputs).router_logits)


def test_training_updates_the_statistics_eval_and_stage_one_do_not():
    model, processor = build_tiny(num_visual_tokens=16, **STANDARDIZE, **OUTCOME_ALL)
    norm = model.model.projector.router.standardize
    inputs, labels = _batch(processor, n=3)
    features = _router_inputs(model.eval(), inputs)  # (3, Cv + Ct)
    assert float(norm.num_updates) == 0  # eval: no update

    model.train()
    model.set_router_uniform(True)  # stage 1: equal weights, the constant caption prompt; nothing gathered
    model(**inputs, labels=labels)
    assert float(norm.num_updates) == 0
    model.set_router_uniform(False)
    model(**inputs, labels=labels)  # every branch: one pass each, the same router inputs each time
    assert float(norm.num_updates) == len(model.config.branches)
    torch.testing.assert_close(norm.running_mean, features.mean(0))
    torch.testing.assert_close(norm.running_var, (features - features.mean(0)).pow(2).mean(0))


def test_outputs_do_not_depend_on_the_rest_of_the_batch():
    model, processor = build_tiny(num_visual_tokens=16, **STANDARDIZE, **OUTCOME_ALL)
    inputs, labels = _batch(processor, n=3)
    model.train()
    model(**inputs, labels=labels)  # statistics gathered
    model.eval()
    one, _ = _batch(processor, n=1)
    with torch.no_grad():
        alone = model(**one).router_logits
        together = model(**inputs).router_logits
    torch.testing.assert_close(alone[0], together[0])


def test_statistics_save_and_reload(tmp_path):
    from transformers import AutoModelForImageTextToText

    model, processor = build_tiny(num_visual_tokens=16, **STANDARDIZE, **OUTCOME_ALL)
    inputs, labels = _batch(processor, n=3)
    model.train()
    model(**inputs, labels=labels)
    model.eval().save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert reloaded.config.router_input_norm == "standardize"
    for name in ("running_mean", "running_var", "num_updates"):
        assert torch.equal(getattr(reloaded.model.projector.router.standardize, name),
                           getattr(model.model.projector.router.standardize, name)), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).router_logits, model(**inputs).router_logits)


def test_standardizing_lets_the_router_read_a_small_question_offset():
    """Two questions that differ by a small offset on a large shared direction (as CLIP's do: cosine 0.998 between
    question types in the mini VTCBench) and prefer opposite branches. In the same number of steps the router
    reading standardised inputs follows the question; the plain LayerNorm router does not."""
    from test_router_outcome import train_bandit_on_two_questions

    def train(norm):
        torch.manual_seed(0)
        model, _ = build_tiny(num_visual_tokens=16, router_input_norm=norm, router_training="outcome")
        generator = torch.Generator().manual_seed(0)
        shared, offset = torch.randn(32, generator=generator), torch.randn(32, generator=generator)
        questions = torch.stack([shared * 20 + offset, shared * 20 - offset])
        normed = F.layer_norm(questions, (32,))
        assert F.cosine_similarity(normed[0], normed[1], dim=0) > 0.99
        shares = train_bandit_on_two_questions(model.model.projector.router, questions, generator, steps=150, lr=1e-3,
                                               eval_pictures=100)
        return sum(shares) / 2

    assert train("standardize") > 0.95
    assert train("layer") < 0.8
