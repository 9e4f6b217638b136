"""LearnPruner's second step inside the language model (`llm_pruning_layer`, issue 15): the text's attention at one
decoder layer keeps each image's top visual tokens for that layer and the later ones. Checked against an
independent reference (eager attention weights of the unpruned model, and a layer loop that masks the dropped
tokens out as keys), in left-padded batches, uneven batches, generation, training, save/reload and device_map."""

import copy
import importlib.util

import pytest
import torch
from conftest import make_image

from configuration_qmop import QMoPConfig
from qmop_tools.testing.tiny import build_config, build_model, build_processor, save_tiny_checkpoint
from modeling_qmop import QMoPForConditionalGeneration

PROMPTS = [
    "USER: <image>\nWhat colour is the circle? ASSISTANT:",
    "USER: <image>\nHow many objects are there in the picture? Answer with a single word. ASSISTANT:",
    "USER: <image>\nDescribe it. ASSISTANT:",
]
LAYER, KEEP, M = 1, 4, 16


def _build(num_layers: int = 3, seed: int = 0, **kwargs):
    """A tiny model whose LLM has `num_layers` layers; pruning from layer `LAYER` on, `KEEP` of `M` tokens kept."""
    processor = build_processor(num_visual_tokens=M)
    processor.tokenizer.padding_side = "left"
    settings = build_config(processor).to_dict()
    settings["text_config"]["num_hidden_layers"] = num_layers
    config = QMoPConfig.from_dict({**settings, **kwargs})  # validated with the final LLM depth
    return build_model(config, seed=seed), processor


@pytest.fixture(scope="module")
def pair():
    """(pruned model, the same weights without pruning, processor)."""
    pruned, processor = _build(llm_pruning_layer=LAYER, llm_pruning_keep=KEEP)
    plain, _ = _build()
    plain.load_state_dict(pruned.state_dict())
    return pruned, plain, processor


def _greedy(model, inputs, n=6):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def _reference(plain, inputs):
    """Independent reference for one sample: (kept visual positions, logits (T, V)). The ranking comes from eager
    attention weights of the unpruned LLM at `LAYER`; the logits from running its layers with the dropped visual
    tokens masked out as keys from `LAYER` on."""
    from transformers import AutoModel

    base = plain.model
    ids = inputs["input_ids"]  # (1, T)
    image_mask = ids == plain.config.image_token_id
    with torch.no_grad():
        features = base.get_image_features(
            inputs["pixel_values"], inputs["query_input_ids"], inputs["query_attention_mask"], num_visual_tokens=M,
            return_dict=True,
        ).image_features
        embeds = base.get_input_embeddings()(ids.masked_fill(image_mask, 0))
        embeds = embeds.masked_scatter(image_mask[..., None].expand_as(embeds), features)  # (1, T, D)
        # A copy of the config: from_config records the attention implementation on the config it is given.
        eager = AutoModel.from_config(copy.deepcopy(plain.config.text_config), attn_implementation="eager").eval()
        eager.load_state_dict(base.language_model.state_dict())
        attentions = eager(inputs_embeds=embeds, output_attentions=True).attentions[LAYER][0]  # (H, T, T)
        visual = image_mask[0].nonzero()[:, 0]
        rows = torch.arange(int(visual.max()) + 1, ids.shape[1])  # the text after the image
        received = attentions[:, rows].mean(0).sum(0)  # (T,)
        kept = visual[received[visual].topk(KEEP).indices].sort().values

        length = ids.shape[1]
        causal = torch.ones(length, length).tril().bool()
        pruned_keys = causal.clone()
        pruned_keys[:, visual[~torch.isin(visual, kept)]] = False
        position_ids = torch.arange(length)[None]
        angles = eager.rotary_emb(embeds, position_ids)
        hidden = embeds
        for index, layer in enumerate(eager.layers):
            allowed = pruned_keys if index >= LAYER else causal
            mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
            out = layer(hidden, attention_mask=mask, position_embeddings=angles, position_ids=position_ids)
            hidden = out[0] if isinstance(out, tuple) else out
        logits = plain.lm_head(eager.norm(hidden))[0]  # (T, V)
    return kept, logits


def _kept_visual(model, output, input_ids):
    """Visual positions the pruned layers ran on: the others come back as zeros in `last_hidden_state`."""
    visual = input_ids == model.config.image_token_id
    alive = output.hidden_states[-1].abs().sum(-1) > 0  # (B, T)
    return [row.nonzero()[:, 0] for row in visual & alive]


# ===================================================================================== config
def test_config_round_trip_and_validation(tmp_path):
    config = _build(llm_pruning_layer=2, llm_pruning_keep=5)[0].config
    config.save_pretrained(tmp_path)
    loaded = QMoPConfig.from_pretrained(tmp_path)
    assert (loaded.llm_pruning_layer, loaded.llm_pruning_keep, loaded.uses_llm_pruning) == (2, 5, True)
    assert not QMoPConfig().uses_llm_pruning
    for bad, message in [(dict(llm_pruning_layer=0), "llm_pruning_layer"), (dict(llm_pruning_layer=2), r"\[1, 2\)"),
                         (dict(llm_pruning_layer=1.0), "llm_pruning_layer"), (dict(llm_pruning_keep=0), "llm_pruning_keep"),
                         (dict(llm_pruning_layer=1, llm_pruning_keep=True), "llm_pruning_keep")]:
        with pytest.raises(ValueError, match=message):
            build_config(build_processor(num_visual_tokens=M), **bad)  # the tiny LLM has 2 layers


# ===================================================================================== exactness
def test_ranking_and_logits_equal_the_independent_reference(pair):
    pruned, plain, processor = pair
    for seed, prompt in enumerate(PROMPTS):
        inputs = processor(images=make_image(seed=seed), text=prompt)
        with torch.no_grad():
            out = pruned(**inputs, output_hidden_states=True)
        kept, logits = _reference(plain, inputs)
        assert _kept_visual(pruned, out, inputs["input_ids"])[0].tolist() == kept.tolist()
        text = inputs["input_ids"][0] != pruned.config.image_token_id
        torch.testing.assert_close(out.logits[0, text], logits[text], rtol=1e-4, atol=1e-5)
        # The pruned layers' caches hold only the kept tokens; the others the whole prompt.
        length = inputs["input_ids"].shape[1]
        cache = out.past_key_values
        assert [cache.get_seq_length(i) for i in range(3)] == [length, length - (M - KEEP), length - (M - KEEP)]


def test_keeping_every_token_changes_nothing(pair):
    _, plain, processor = pair
    everything, _ = _build(llm_pruning_layer=LAYER, llm_pruning_keep=M)
    everything.load_state_dict(plain.state_dict())
    inputs = processor(images=make_image(seed=4), text=PROMPTS[1])
    with torch.no_grad():
        assert torch.equal(everything(**inputs).logits, plain(**inputs).logits)


def test_the_question_decides_which_tokens_survive(pair):
    pruned, _, processor = pair
    image = make_image(seed=5)
    kept = set()
    for prompt in PROMPTS:
        inputs = processor(images=image, text=prompt)
        with torch.no_grad():
            out = pruned(**inputs, output_hidden_states=True)
        visual = (inputs["input_ids"][0] == pruned.config.image_token_id).nonzero()[:, 0]
        kept.add(tuple((_kept_visual(pruned, out, inputs["input_ids"])[0] - visual[0]).tolist()))
    assert len(kept) > 1, "three questions kept the same visual tokens"


def test_left_padded_batch_generates_as_single_samples(pair):
    pruned, _, processor = pair
    images = [make_image(seed=s) for s in range(3)]
    batch = processor(images=images, text=PROMPTS, padding=True)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the prompts should need padding"
    singles = [_greedy(pruned, processor(images=i, text=p))[0] for i, p in zip(images, PROMPTS)]
    assert [row.tolist() for row in _greedy(pruned, batch)] == [s.tolist() for s in singles]


def test_uneven_batch_forward_is_exact_and_generation_refuses_it(pair):
    """A text-only sample beside an image sample drops nothing: its row is padded with masked tokens, which a
    cache could not tell apart later, so the returned cache is None and generate() refuses the batch."""
    pruned, _, processor = pair
    text_only = "USER: Name a colour. ASSISTANT:"
    batch = processor(images=[make_image(seed=1)], text=[PROMPTS[0], text_only], padding=True)
    with torch.no_grad():
        out = pruned(**batch)
        alone = [pruned(**processor(images=make_image(seed=1), text=PROMPTS[0])).logits[0],
                 pruned(**processor(text=text_only)).logits[0]]
    assert out.past_key_values is None
    for row, single in enumerate(alone):
        valid = batch["attention_mask"][row].bool()
        real = valid & (batch["input_ids"][row] != pruned.config.image_token_id)
        single_real = processor(text=text_only)["input_ids"][0] if row else None
        expected = single if row else single[(processor(images=make_image(seed=1), text=PROMPTS[0])["input_ids"][0]
                                               != pruned.config.image_token_id)]
        got = out.logits[row][real]
        assert single_real is None or got.shape[0] == single_real.shape[0]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="same number of images"):
        pruned.generate(**batch, max_new_tokens=2)


def test_static_cache_is_refused(pair):
    pruned, _, processor = pair
    with pytest.raises(ValueError, match="DynamicCache"):
        pruned.generate(**processor(images=make_image(), text=PROMPTS[0]), max_new_tokens=2,
                        cache_implementation="static")


# ===================================================================================== training
def test_training_ranks_with_the_prompt_not_the_answer(pair):
    pruned, _, processor = pair
    image = make_image(seed=2)
    kept = []
    for answer in ("red", "a large blue square on the left"):
        inputs = processor(images=image, text=PROMPTS[0] + " " + answer)
        prompt_length = processor(images=image, text=PROMPTS[0])["input_ids"].shape[1]
        labels = inputs["input_ids"].clone()
        labels[:, :prompt_length] = -100
        with torch.no_grad():
            out = pruned(**inputs, labels=labels, output_hidden_states=True)
        kept.append(_kept_visual(pruned, out, inputs["input_ids"])[0].tolist())
        assert torch.isfinite(out.loss)
    assert kept[0] == kept[1]

    model, _ = _build(llm_pruning_layer=LAYER, llm_pruning_keep=KEEP)
    model.train()
    inputs = processor(images=[image, make_image(seed=3)], text=[p + " red" for p in PROMPTS[:2]], padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model(**inputs, labels=labels).loss.backward()
    layers = model.model.language_model.layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[LAYER + 1].parameters())


# ===================================================================================== save / reload, device_map
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("llm") / "qmop-tiny-llm"), num_visual_tokens=M,
                                llm_pruning_layer=1, llm_pruning_keep=KEEP)


@pytest.mark.parametrize("device_map", [None, "auto"])
def test_save_and_reload_through_auto_classes(checkpoint, device_map):
    from transformers import AutoModelForImageTextToText

    from processing_qmop import QMoPProcessor

    processor = QMoPProcessor.from_pretrained(checkpoint)
    inputs = processor(images=make_image(seed=2), text=PROMPTS[0])
    local = QMoPForConditionalGeneration.from_pretrained(checkpoint).eval()
    remote = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True,
                                                         device_map=device_map).eval()
    assert remote.config.llm_pruning_layer == 1
    with torch.no_grad():
        out = remote(**inputs)
        assert torch.equal(out.logits, local(**inputs).logits)
    length = inputs["input_ids"].shape[1]
    assert out.past_key_values.get_seq_length(1) == length - (M - KEEP)
    assert torch.equal(_greedy(remote, inputs), _greedy(local, inputs))


def test_gradient_checkpointing_recomputes_the_same_selection(pair):
    pruned, _, processor = pair
    inputs = processor(images=[make_image(seed=0), make_image(seed=6)], text=[p + " red" for p in PROMPTS[:2]],
                       padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model, _ = _build(llm_pruning_layer=LAYER, llm_pruning_keep=KEEP)
        model.load_state_dict(pruned.state_dict())
        model.train()
        model.config.router_gumbel_noise = False
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**inputs, labels=labels, use_cache=False).loss.backward()
        grads.append(model.model.language_model.layers[LAYER].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_4bit_ranks_with_the_quantized_projections(tmp_path):
    """Under 4-bit the ranking calls the layer's own (quantized) q/k projections, so selection and generation run."""
    from transformers import BitsAndBytesConfig

    folder = save_tiny_checkpoint(str(tmp_path / "llm-bnb"), num_visual_tokens=M, width=64, llm_pruning_layer=1,
                                  llm_pruning_keep=KEEP)  # width 64: bitsandbytes' CPU 4-bit kernels need it
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = QMoPForConditionalGeneration.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)
    attn = model.model.language_model.layers[1].self_attn
    assert type(attn.q_proj).__name__ == "Linear4bit"
    processor = build_processor(num_visual_tokens=M)
    inputs = processor(images=make_image(), text=PROMPTS[0])
    with torch.no_grad():
        out = model.eval()(**inputs)
    length = inputs["input_ids"].shape[1]
    assert out.past_key_values.get_seq_length(1) == length - (M - KEEP)
    assert _greedy(model, inputs).shape == (1, 6)


# ===================================================================================== FLOPs and KV
def test_7b_flops_and_kv_on_meta_alone_and_composed_with_tower_pruning():
    from qmop_tools.bench.runner import BenchSettings, run_benchmark

    results = run_benchmark(BenchSettings(preset="7b", device="meta", budgets=[64], tower_pruning="qg_vtc",
                                          llm_pruning="2:32"), log=lambda *_: None)
    records = {r["name"]: r for r in results["variants"]}
    plain, alone, both = records["QMoP M=64"], records["QMoP+llm@2:32 M=64"], records["QMoP+qg_vtc+llm@2:32 M=64"]
    for record in records.values():  # the analytic count explains every counted FLOP, the ranking included
        assert record["flops"]["counted_over_analytic"] == pytest.approx(1.0, rel=1e-5)
    assert both["flops_vs_llava"] < alone["flops_vs_llava"] < plain["flops_vs_llava"]
    # 2 of 32 layers hold all 104 positions, 30 hold 40 text + 32 visual: KV (2·104 + 30·72) / (32·616) of LLaVA's.
    assert alone["kv_ratio_formula"] == "37/308"
    assert [t["value"] for t in results["targets"][:2]] == [None, plain["flops_vs_llava"]]  # targets read plain QMoP


def test_smoke_benchmark_runs_the_pruned_forward_it_counts():
    from qmop_tools.bench.runner import BenchSettings, run_benchmark

    results = run_benchmark(BenchSettings(preset="smoke", budgets=[4], llm_pruning="1:2", components=False),
                            log=lambda *_: None)
    record = next(r for r in results["variants"] if r["name"] == "QMoP+llm@1:2 M=4")
    flops = record["flops"]
    assert flops["whole_forward"] == flops["counted"]["total"]  # the real forward runs what the parts count
    # 4.57's rotary embedding is a small matrix product the analytic count leaves out (LLaVA's row too): 4e-5.
    assert flops["counted_over_analytic"] == pytest.approx(1.0, rel=1e-4)
    assert record["kv_ratio_exact"], (record["kv_ratio_measured"], record["kv_ratio_formula"])
    with pytest.raises(ValueError, match="LAYER:KEEP"):
        run_benchmark(BenchSettings(preset="smoke", llm_pruning="two"), log=lambda *_: None)
