"""TRL's SFTTrainer on a tiny QMoP-LLaVA, as a llava-hf user of TRL writes it (qmop_tools.train.sft, docs/training.md):
the conversational (messages + images), prompt/completion and assistant-only formats; labels on the answers only,
placeholders never labelled, the loss TRL optimises equal to the model's own loss (router terms included), the
router temperature annealed."""

import pytest
import torch
from conftest import make_image
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from qmop_tools.testing.tiny import build_config, build_model, build_processor
from modeling_qmop import TRANSFORMERS_V5, router_temperature_at
from qmop_tools.train import configure_trainable, get_template, lora_target_pattern, router_loss
from qmop_tools.train.sft import QMoPSFTTrainer

BUDGET = 4  # placeholders per image: short sequences
QUESTIONS = ["what is in the image?", "how many objects are there?"]
ANSWERS = ["a cat", "three objects there"]
FOLLOW_UP = ("what colour is the cat?", "it is green")


def _user(text, image=True):
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def _assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def conversational_rows():
    """Two samples; the first is two turns, the image in the first question."""
    first = [_user(QUESTIONS[0]), _assistant(ANSWERS[0]), _user(FOLLOW_UP[0], image=False), _assistant(FOLLOW_UP[1])]
    second = [_user(QUESTIONS[1]), _assistant(ANSWERS[1])]
    return [{"images": [make_image(seed=0)], "messages": first}, {"images": [make_image(seed=1)], "messages": second}]


def prompt_completion_rows():
    return [
        {"images": [make_image(seed=i)], "prompt": [_user(question)], "completion": [_assistant(answer)]}
        for i, (question, answer) in enumerate(zip(QUESTIONS, ANSWERS))
    ]


def trained(*answers):
    """The words of answers as the labels decode: each closed by the EOS token, so that the model learns to stop."""
    return [word for answer in answers for word in f"{answer}</s>".split()]


FORMATS = {  # name: (rows, SFTConfig arguments, the words each sample is trained on; None = the whole sequence)
    "messages": (conversational_rows, {}, None),
    "assistant_only": (conversational_rows, {"assistant_only_loss": True},
                       [trained(ANSWERS[0], FOLLOW_UP[1]), trained(ANSWERS[1])]),
    "prompt_completion": (prompt_completion_rows, {}, [trained(answer) for answer in ANSWERS]),
}


@pytest.fixture(scope="module")
def processor():
    return build_processor(num_visual_tokens=BUDGET)


def make_trainer(processor, tmp_path, rows, trainer_class=QMoPSFTTrainer, gumbel=False, **config):
    """A fresh tiny model (Gumbel noise off unless asked: a training-mode forward is then deterministic) and a
    trainer with the SFTConfig a user writes (float32 unless `bf16` is given: exact loss comparisons)."""
    model = build_model(build_config(processor, router_gumbel_noise=gumbel))
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, learning_rate=1e-3,
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                    dataloader_num_workers=0, disable_tqdm=True, seed=0)
    settings.update(config)
    return trainer_class(model=model, args=SFTConfig(**settings), train_dataset=Dataset.from_list(rows),
                         processing_class=processor)


def first_batch(trainer):
    """The batch training sees first (TRL's collator through the trainer's dataloader)."""
    return next(iter(trainer.get_train_dataloader()))


def token_cross_entropy(logits, labels):
    """Mean next-token cross-entropy over labels != -100, written out."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    return torch.nn.functional.cross_entropy(logits[mask], labels[mask])


def skip_unsupported(name):
    if name == "assistant_only" and not TRANSFORMERS_V5:
        pytest.skip("TRL 1.16 needs transformers >= 5.18 for assistant_only_loss on images "
                    "(test_assistant_only_loss_refused_on_4x)")


# ===================================================================================== labels
@pytest.mark.parametrize("name", list(FORMATS))
def test_labels_on_answers_only_and_never_on_placeholders(processor, tmp_path, name):
    skip_unsupported(name)
    rows, config, trained_words = FORMATS[name]
    trainer = make_trainer(processor, tmp_path, rows(), **config)
    batch = first_batch(trainer)
    tokenizer = processor.tokenizer
    placeholders = batch["input_ids"] == processor.image_token_id
    assert placeholders.sum(dim=1).tolist() == [BUDGET, BUDGET]  # one image per sample, expanded
    assert not bool((batch["labels"][placeholders] != -100).any())
    for row in range(2):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        if trained_words is None:  # language modelling: every real token except the placeholders
            expected = ids.masked_fill((batch["attention_mask"][row] == 0) | placeholders[row], -100)
            expected[0] = -100  # never predicted (and so not counted in `num_items_in_batch`)
            assert labels.tolist() == expected.tolist()
        else:
            assert tokenizer.decode(ids[labels != -100]).split() == trained_words[row]
    # The router reads each image's question, not the chat scaffolding or the answer.
    queries = processor.query_tokenizer.batch_decode(batch["query_input_ids"], skip_special_tokens=True)
    assert [q.strip() for q in queries] == QUESTIONS


def test_assistant_only_loss_refused_on_4x(processor, tmp_path):
    if TRANSFORMERS_V5:
        pytest.skip("transformers 5.x: assistant_only_loss runs (test_labels_on_answers_only_and_never_on_placeholders)")
    with pytest.raises(ValueError, match="transformers>=5.18"):
        make_trainer(processor, tmp_path, conversational_rows(), assistant_only_loss=True)


def test_processor_outputs_for_assistant_masks(processor):
    """ProcessorMixin's optional outputs: where each `<image>` was expanded, and which tokens are placeholders."""
    prompt = "USER: <image>\nwhat is in the image? ASSISTANT: a cat "
    out = processor(images=[make_image()], text=[prompt], return_text_replacement_offsets=True,
                    return_mm_token_type_ids=True)
    [[offset]] = out["text_replacement_offsets"]
    start = prompt.index("<image>")
    assert offset["span"] == (start, start + len("<image>"))
    assert offset["new_span"] == (start, start + BUDGET * len("<image>"))
    assert out["mm_token_type_ids"].tolist() == (out["input_ids"] == processor.image_token_id).long().tolist()
    assert "text_replacement_offsets" not in processor(images=[make_image()], text=[prompt])


def test_chat_template_closes_answers_with_eos(processor):
    """LLaVA-1.5's conversation format: each answer ends with `</s>` (so answer-only training learns to stop), the
    generation prompt is llava-hf's, and each image's question is still found after a `</s>`."""
    messages = [_user(QUESTIONS[0]), _assistant(ANSWERS[0]), _user(QUESTIONS[1])]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == f"USER: <image>\n{QUESTIONS[0]} ASSISTANT: {ANSWERS[0]}</s>USER: <image>\n{QUESTIONS[1]} ASSISTANT:"
    out = processor(images=[make_image(seed=0), make_image(seed=1)], text=prompt)
    queries = processor.query_tokenizer.batch_decode(out["query_input_ids"], skip_special_tokens=True)
    assert [q.strip() for q in queries] == QUESTIONS


def test_same_training_text_as_the_qmop_trainer(processor):
    """TRL renders a conversation with the processor's chat template; `scripts/train_qmop.py --template llava_hf`
    renders it itself: the two texts, and so what each trains on, are the same."""
    messages = conversational_rows()[0]["messages"]
    rounds = [("<image>\n" + QUESTIONS[0], ANSWERS[0]), FOLLOW_UP]
    ours = get_template("llava_hf").render(rounds, "<image>", processor.tokenizer.eos_token, has_image=True)
    assert processor.apply_chat_template(messages) == ours.text
    assert [ours.text[start:end] for start, end in ours.answer_spans] == [f"{ANSWERS[0]}</s>", f"{FOLLOW_UP[1]}</s>"]


# ===================================================================================== loss
@pytest.mark.parametrize("name", list(FORMATS))
def test_trl_optimises_the_models_own_loss(processor, tmp_path, name):
    """The loss of TRL's training step (logged before the update) equals the model's own loss on the same batch with
    the same weights: the LM loss over the answer tokens + the router's aux and z-losses."""
    skip_unsupported(name)
    rows, config, _ = FORMATS[name]
    trainer = make_trainer(processor, tmp_path, rows(), **config)
    batches = []
    collate = trainer.data_collator
    trainer.data_collator = lambda examples: batches.append(collate(examples)) or batches[-1]
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    [logged] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    model = trainer.model
    model.load_state_dict(weights)  # the weights of that step
    model.train()
    with torch.no_grad():
        outputs = model(**batches[0])
    router_terms = router_loss(outputs, model.config)
    assert float(router_terms) > 0.005  # the aux and z-losses are there to be missed
    assert logged == pytest.approx(float(outputs.loss), rel=1e-5, abs=1e-4)  # 4.57 logs 4 decimals
    lm_loss = token_cross_entropy(outputs.logits, batches[0]["labels"])
    assert float(outputs.loss) == pytest.approx(float(lm_loss + router_terms), rel=1e-5)


def test_stock_sft_trainer_drops_the_router_terms(processor, tmp_path):
    """Why QMoPSFTTrainer exists: on the same batch, stock SFTTrainer's fused LM head optimises the LM loss alone."""
    rows, config, _ = FORMATS["prompt_completion"]
    ours = make_trainer(processor, tmp_path, rows(), **config)
    stock = make_trainer(processor, tmp_path, rows(), trainer_class=SFTTrainer, **config)
    stock.model.load_state_dict(ours.model.state_dict())
    batch = first_batch(ours)
    ours.model.train(), stock.model.train()
    ours_loss = ours.compute_loss(ours.model, dict(batch))
    stock_loss = stock.compute_loss(stock.model, dict(batch))
    with torch.no_grad():
        router_terms = router_loss(ours.model(**batch), ours.model.config)
    assert float(ours_loss) == pytest.approx(float(stock_loss + router_terms), rel=1e-5)
    assert abs(float(ours_loss) - float(stock_loss)) > 0.005


def test_router_terms_scaled_under_gradient_accumulation(processor, tmp_path):
    """With `num_items_in_batch` the Trainer does not divide by the accumulation steps: the LM loss is normalised over
    the accumulated tokens, the router terms (per-batch means) are divided by the steps."""
    rows, config, _ = FORMATS["prompt_completion"]
    trainer = make_trainer(processor, tmp_path, rows(), gradient_accumulation_steps=2, **config)
    batch = first_batch(trainer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    num_items = 2 * int((batch["labels"][:, 1:] != -100).sum())  # as if the other micro-batch had as many tokens
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(num_items))
    with torch.no_grad():
        outputs = trainer.model(**batch)
    labels = batch["labels"][:, 1:]
    token_sum = torch.nn.functional.cross_entropy(outputs.logits[:, :-1][labels != -100].float(), labels[labels != -100],
                                                  reduction="sum")
    expected = token_sum / num_items + router_loss(outputs, trainer.model.config) / 2
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


# ===================================================================================== router schedule
def test_router_temperature_annealed_during_trl_training(processor, tmp_path):
    """Default SFTConfig precision (bf16 autocast) and Gumbel noise on, as a user trains: the temperature follows the
    schedule step by step and is logged with TRL's metrics and the router's."""
    steps = 4
    trainer = make_trainer(processor, tmp_path, conversational_rows(), gumbel=True, bf16=None, max_steps=steps)
    assert trainer.args.bf16  # SFTConfig's own default
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    config = trainer.model.config
    expected = [router_temperature_at(config, step / steps) for step in range(steps)]
    assert [entry["router_temperature"] for entry in logs] == pytest.approx(expected)
    assert expected[0] == config.router_temperature and expected[-1] < expected[0]
    assert trainer.model.model.projector.router.temperature == pytest.approx(expected[-1])
    for key in ("aux_loss", "router_z_loss", "router_saturated", "mean_token_accuracy", "entropy", "num_tokens",
                *(f"router_weight/{branch}" for branch in config.branches)):
        assert key in logs[0], key
    assert 0.0 <= logs[0]["router_saturated"] <= 1.0
    assert sum(logs[0][f"router_weight/{branch}"] for branch in config.branches) == pytest.approx(1.0, abs=1e-4)


def test_lora_through_peft_config(processor, tmp_path):
    """LoRA as TRL users add it (`peft_config`), the projector trained in full as a PEFT `modules_to_save`: the
    temperature reaches the router copy that runs, and the loss is still the model's own."""
    from peft import LoraConfig

    model = build_model(build_config(processor, router_gumbel_noise=False))
    configure_trainable(model, stage=2, train_language_model=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_pattern(model, ["q_proj", "v_proj"]),
                      modules_to_save=["projector"], task_type="CAUSAL_LM")
    steps = 3
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=steps, logging_steps=1,
                     save_strategy="no", report_to="none", use_cpu=True, bf16=False, disable_tqdm=True)
    trainer = QMoPSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(prompt_completion_rows()),
                             processing_class=processor, peft_config=lora)
    batch = first_batch(trainer)
    trainer.train()
    active = trainer.model.base_model.model.model.projector.modules_to_save["default"].router
    assert active.temperature == pytest.approx(router_temperature_at(model.config, (steps - 1) / steps))
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("lora_" in name for name in trainable) and any(".router." in name for name in trainable)
    assert not any("vision_tower" in name or "text_encoder" in name for name in trainable)
    trainer.model.train()
    with torch.no_grad():
        outputs = trainer.model(**batch)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert float(loss) == pytest.approx(float(outputs.loss), rel=1e-5)
    assert float(outputs.loss) == pytest.approx(
        float(token_cross_entropy(outputs.logits, batch["labels"]) + router_loss(outputs, model.config)), rel=1e-5)
