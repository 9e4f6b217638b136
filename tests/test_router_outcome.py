"""router_training="outcome": the router as a contextual bandit (one branch drawn per training image, the router
regresses that branch's LM loss, inference picks the lowest predicted loss)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import make_image
from qmop_tools.testing.tiny import build_tiny
from modeling_qmop import QueryGuidedRouter, outcome_regression_loss, per_sample_lm_loss
from qmop_tools.train.trainer import router_loss

OUTCOME = {"router_training": "outcome", "router_eval_temperature": 1.0}


def _reference_sample_losses(logits, labels, image_token_id):
    """Mean next-token cross-entropy per sample, written out with log_softmax and gather."""
    targets = labels[:, 1:].masked_fill(labels[:, 1:] == image_token_id, -100)  # (B, T-1)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
    supervised = targets != -100
    return (token * supervised).sum(1) / supervised.sum(1)


def test_config_defaults_and_refusals():
    model, _ = build_tiny(num_visual_tokens=16, **OUTCOME)
    assert model.config.router_top_k == 1  # the LM never sees a mixture
    with pytest.raises(ValueError, match="router_top_k"):
        build_tiny(num_visual_tokens=16, router_training="outcome", router_top_k=2)
    with pytest.raises(ValueError, match="router_logit_cap"):
        build_tiny(num_visual_tokens=16, router_training="outcome", router_logit_cap=1.0)
    with pytest.raises(ValueError, match="router_exploration"):
        build_tiny(num_visual_tokens=16, router_training="outcome", router_exploration=1.5)
    with pytest.raises(ValueError, match="router_training"):
        build_tiny(num_visual_tokens=16, router_training="bandit")
    with pytest.raises(TypeError, match="router_outcome_loss_coef"):
        build_tiny(num_visual_tokens=16, router_training="outcome", router_outcome_loss_coef="1")
    with pytest.raises(ValueError, match="router_outcome_branches"):
        build_tiny(num_visual_tokens=16, router_training="outcome", router_outcome_branches="every")
    with pytest.raises(ValueError, match="applies to `router_training`='outcome' only"):
        build_tiny(num_visual_tokens=16, router_outcome_branches="all")  # a mixture router


def test_training_draws_one_branch_per_image_and_adds_the_regression_loss():
    """Two samples, the first with two images: each image's drawn branch is regressed on its own sample's loss."""
    model, processor = build_tiny(num_visual_tokens=16, router_outcome_loss_coef=0.5, **OUTCOME)
    images = [make_image(seed=s) for s in range(3)]
    texts = ["USER: <image> <image>\nCompare them. ASSISTANT: the left", "USER: <image>\nWhat is it? ASSISTANT: a dog"]
    inputs = processor(images=[images[:2], images[2:]], text=texts)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.train()
    torch.manual_seed(0)
    out = model(**inputs, labels=labels)
    weights = out.router_weights  # (3, 3)
    assert weights.shape == (3, 3) and set(weights.flatten().tolist()) <= {0.0, 1.0}
    assert torch.equal(weights.sum(-1), torch.ones(3))
    assert out.aux_loss == 0 and out.router_z_loss == 0

    sample_losses = _reference_sample_losses(out.logits.detach(), labels, model.config.image_token_id)  # (2,)
    predicted = -(out.router_logits * weights).sum(-1).detach()  # (3,)
    expected = ((predicted - sample_losses[torch.tensor([0, 0, 1])]) ** 2).mean()
    torch.testing.assert_close(out.router_outcome_loss.detach(), expected)
    lm_loss = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(),
        labels[:, 1:].masked_fill(labels[:, 1:] == model.config.image_token_id, -100).reshape(-1),
    )
    torch.testing.assert_close(out.loss.detach(), lm_loss.detach() + 0.5 * expected, rtol=1e-5, atol=1e-6)
    # The trainer's accumulation scaling treats the term as a router term.
    torch.testing.assert_close(torch.as_tensor(router_loss(out, model.config)).detach(), 0.5 * expected)
    # Stage 1's equal weights draw no branch: nothing to regress, the loss is the LM loss.
    model.set_router_uniform(True)
    uniform = model(**inputs, labels=labels)
    assert uniform.router_outcome_loss is None and torch.equal(uniform.router_weights, torch.full((3, 3), 1 / 3))
    model.set_router_uniform(False)

    # Only the regression term trains the router: the drawn branch's weight is a constant for the LM loss.
    model.zero_grad()
    out.loss.backward()
    router = model.model.projector.router
    assert router.linear_2.weight.grad.abs().sum() > 0
    model.zero_grad()
    lm_only = model(**inputs, labels=labels)
    (lm_only.loss - 0.5 * lm_only.router_outcome_loss).backward()
    assert router.linear_2.weight.grad is None or router.linear_2.weight.grad.abs().sum() == 0
    model.eval()


def test_uniform_exploration_trains_every_branch():
    model, _ = build_tiny(num_visual_tokens=16, **OUTCOME)
    router = model.model.projector.router.train()
    with torch.no_grad():
        router.linear_2.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))  # a strong preference for pooling
        cls_token, query = torch.randn(3000, router.vision_norm.normalized_shape[0]), torch.randn(3000, 32)
        drawn = router(cls_token, query).weights.mean(0)  # exploration 1.0: uniform whatever the preference
        assert torch.allclose(drawn, torch.full((3,), 1 / 3), atol=0.03)
        router.exploration = 0.0  # greedy: always the preferred branch
        assert torch.equal(router(cls_token, query).weights.mean(0), torch.tensor([1.0, 0.0, 0.0]))
        router.uniform = True  # stage 1's equal-weight routing: every branch at 1/3 for every image, as for a mixture
        assert torch.equal(router(cls_token[:5], query[:5]).weights, torch.full((5, 3), 1 / 3))


def test_inference_picks_the_lowest_predicted_loss(image):
    model, processor = build_tiny(num_visual_tokens=16, **OUTCOME)
    inputs = processor(images=[image, make_image(seed=3)], text=["USER: <image>\nWhat? ASSISTANT:"] * 2)
    with torch.no_grad():
        out = model(**inputs)
        again = model(**inputs)
    assert torch.equal(out.router_weights, F.one_hot(out.router_logits.argmax(-1), 3).float())
    assert torch.equal(out.router_weights, again.router_weights)  # deterministic
    assert torch.allclose(out.router_probs, torch.softmax(out.router_logits, -1))  # eval temperature 1.0
    assert out.router_outcome_loss is None  # eval mode: no regression


def test_per_sample_loss_skips_unsupervised_samples():
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[1, 2, -100, 3, -100], [-100] * 5])
    losses = per_sample_lm_loss(logits, targets)
    reference = F.cross_entropy(logits[0], targets[0], ignore_index=-100)
    torch.testing.assert_close(losses[0], reference)
    assert torch.isnan(losses[1])
    # An image whose sample has no target adds nothing to the regression.
    router_logits = torch.tensor([[-1.0, 0.0], [5.0, 5.0]], requires_grad=True)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = outcome_regression_loss(router_logits, weights, losses, torch.tensor([0, 1]))
    torch.testing.assert_close(loss, (1.0 - losses[0]) ** 2)
    loss.backward()
    assert router_logits.grad[1].abs().sum() == 0


def train_bandit_on_two_questions(router, questions, generator, steps: int, lr: float, noise: float = 0.0,
                                  eval_pictures: int = 50) -> tuple:
    """A synthetic loss per (question, branch): question A (questions[0]) is answered best through branch 0, question
    B through branch 2, whatever the picture. The router is trained only by observing the drawn branch's loss (plus
    Gaussian noise of std `noise`) for random pictures, batch 32. Returns the shares of fresh pictures it then routes
    to branch 0 for question A and to branch 2 for question B."""
    vision_width = router.vision_norm.normalized_shape[0]
    branch_loss = torch.tensor([[0.5, 1.5, 2.0], [2.0, 1.5, 0.5]])  # (question, branch)
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    router.train()
    for _ in range(steps):
        which = torch.randint(2, (32,), generator=generator)
        out = router(torch.randn(32, vision_width, generator=generator), questions[which])
        observed = (branch_loss[which] * out.weights).sum(-1)
        if noise:
            observed = observed + noise * torch.randn(32, generator=generator)
        loss = outcome_regression_loss(out.logits, out.weights, observed, torch.arange(32))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    router.eval()
    with torch.no_grad():
        pictures = torch.randn(eval_pictures, vision_width, generator=generator)
        choice_a = router(pictures, questions[0].expand(eval_pictures, -1)).weights.argmax(-1)
        choice_b = router(pictures, questions[1].expand(eval_pictures, -1)).weights.argmax(-1)
    return (choice_a == 0).float().mean().item(), (choice_b == 2).float().mean().item()


def test_the_bandit_learns_a_question_dependent_choice():
    """Trained only by observing the drawn branch's loss, the router's eval choice follows the question."""
    model, _ = build_tiny(num_visual_tokens=16, **OUTCOME)
    generator = torch.Generator().manual_seed(0)
    questions = torch.randn(2, 32, generator=generator)  # two question embeddings
    share_a, share_b = train_bandit_on_two_questions(model.model.projector.router, questions, generator, steps=300,
                                                     lr=3e-3, noise=0.1)
    assert share_a > 0.95 and share_b > 0.95


def test_outcome_router_saves_and_reloads(tmp_path, image):
    from transformers import AutoModelForImageTextToText

    model, processor = build_tiny(num_visual_tokens=16, router_exploration=0.25, **OUTCOME)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.config.router_training == "outcome" and reloaded.config.router_exploration == 0.25
    inputs = processor(images=image, text="USER: <image>\nWhat? ASSISTANT:")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).router_logits, model(**inputs).router_logits)


def test_training_overrides_switch_a_checkpoint_to_outcome_and_are_checked(tiny_checkpoint):
    from transformers import TrainingArguments

    from qmop_tools.train import ModelArguments
    from qmop_tools.train.run import load_model_and_processor

    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="router_top_k"):  # the checkpoint mixes 2 branches
        load_model_and_processor(ModelArguments(model_name_or_path=tiny_checkpoint, stage=2, router_training="outcome"), args)
    model, _ = load_model_and_processor(
        ModelArguments(model_name_or_path=tiny_checkpoint, stage=2, router_training="outcome", router_top_k=1,
                       router_exploration=0.5, router_outcome_branches="all"), args)
    router = model.model.projector.router
    assert model.config.router_training == "outcome" and router.outcome and router.exploration == 0.5
    assert model.config.router_outcome_branches == "all"


def test_forced_branch_routes_every_image_through_one_branch(image):
    model, processor = build_tiny(num_visual_tokens=16)  # a mixture router, top-2
    inputs = processor(images=[image, make_image(seed=5)], text=["USER: <image>\nWhat? ASSISTANT:"] * 2)
    with torch.no_grad():
        routed = model(**inputs)
        with model.forced_branch("pruning"):
            forced = model(**inputs)
        again = model(**inputs)
    assert torch.equal(forced.router_weights, torch.tensor([[0.0, 0.0, 1.0]] * 2))
    assert torch.equal(forced.router_logits, routed.router_logits)  # the router still ran
    assert (forced.kept_patch_indices >= 0).all()  # pruning chose patches for both images
    assert torch.equal(again.router_weights, routed.router_weights)  # routing is back after the block
    with pytest.raises(ValueError, match="unknown branch 'crop'"):
        with model.forced_branch("crop"):
            pass
    blind, _ = build_tiny(num_visual_tokens=16, router_mode="uniform")
    with pytest.raises(ValueError, match="no router"):
        with blind.forced_branch("pooling"):
            pass


def test_every_branch_training_averages_one_pass_per_branch():
    """`router_outcome_branches="all"`: the loss is the mean of the forced single-branch losses (each with its own
    branch's regression term); logits and image tokens follow the router's choice; every expert gets a gradient."""
    model, processor = build_tiny(num_visual_tokens=16, router_outcome_branches="all", router_outcome_loss_coef=0.5,
                                  **OUTCOME)
    images = [make_image(seed=s) for s in range(3)]
    texts = ["USER: <image> <image>\nCompare them. ASSISTANT: the left", "USER: <image>\nWhat is it? ASSISTANT: a dog"]
    inputs = processor(images=[images[:2], images[2:]], text=texts)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.train()
    out = model(**inputs, labels=labels)
    forced = {}
    for branch in model.config.branches:
        with model.forced_branch(branch):
            forced[branch] = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, torch.stack([f.loss for f in forced.values()]).mean())
    torch.testing.assert_close(out.router_outcome_loss,
                               torch.stack([f.router_outcome_loss for f in forced.values()]).mean())
    # Each forced pass regressed its own branch's logit on its own per-sample losses.
    column = list(model.config.branches).index("resampler")
    sample_losses = _reference_sample_losses(forced["resampler"].logits.detach(), labels, model.config.image_token_id)
    expected = ((-out.router_logits[:, column].detach() - sample_losses[torch.tensor([0, 0, 1])]) ** 2).mean()
    torch.testing.assert_close(forced["resampler"].router_outcome_loss.detach(), expected)

    choice = out.router_logits.argmax(-1)  # (3,)
    assert torch.equal(out.router_weights, F.one_hot(choice, 3).float())
    branches = list(model.config.branches)
    for i in range(3):
        torch.testing.assert_close(out.image_hidden_states[i], forced[branches[choice[i]]].image_hidden_states[i])
    for sample, first_image in ((0, 0), (1, 2)):
        torch.testing.assert_close(out.logits[sample], forced[branches[choice[first_image]]].logits[sample])

    model.zero_grad()
    out.loss.backward()
    projector = model.model.projector
    for branch in branches:
        grads = [p.grad for p in getattr(projector, f"{branch}_branch").parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), branch
    assert projector.router.linear_2.weight.grad.abs().sum() > 0
    # A text-only batch (no image to route, as TRL's collator sends an empty `pixel_values`) makes one plain pass.
    text_only = processor(text=["USER: Hello? ASSISTANT: hi"])
    out_text = model(**text_only, pixel_values=torch.zeros(0, 3, 48, 48), labels=text_only["input_ids"])
    assert out_text.router_logits is None and torch.isfinite(out_text.loss)
    # Stage 1 (equal weights) and evaluation make one pass, as with sampled branches.
    model.set_router_uniform(True)
    assert model(**inputs, labels=labels).router_outcome_loss is None
    model.set_router_uniform(False)
    model.eval()
    with torch.no_grad():
        assert model(**inputs, labels=labels).router_outcome_loss is None
