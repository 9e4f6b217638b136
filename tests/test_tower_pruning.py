"""QG-VTC tower pruning (issue 15): config, the tower loop, the projector on a partial grid, generation, save/reload,
training, device_map and 4-bit. Tiny models (64 patches on an 8x8 grid, two vision layers run)."""

import importlib.util
import json
import os

import pytest
import torch
from conftest import make_image
from safetensors.torch import load_file
from test_conversion import _settings as conversion_settings
from test_conversion import sources  # noqa: F401  (the tiny LLaVA + CLIP sources fixture)

from configuration_qmop import QMoPConfig
from qmop_tools.testing.tiny import build_processor, build_tiny, save_tiny_checkpoint
from modeling_qmop import QMoPForConditionalGeneration, pool_patch_grid, select_patches

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
PROMPTS = [
    "USER: <image>\nWhat colour is the circle? ASSISTANT:",
    "USER: <image>\nHow many objects are there in the picture? Answer with a single word. ASSISTANT:",
    "USER: <image>\nDescribe it. ASSISTANT:",
]
# Two steps on the tiny tower: 64 -> 40 patches after layer 0, 40 -> 20 after layer 1 (the feature layer).
TWO_STEPS = dict(tower_pruning_schedule="custom", tower_pruning_layers=[0, 1], tower_pruning_keep=[40, 20])


@pytest.fixture(scope="module")
def two_steps():
    """All three branches (pruning with question score and recycling) after two question-guided tower steps."""
    return build_tiny(num_visual_tokens=9, pruning_score="question_relevance", pruning_recycle=True, **TWO_STEPS)


def _greedy(model, inputs, n=5):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


# ===================================================================================== config
def test_qg_vtc_schedule_is_table_1_at_llava_shapes_and_scales_to_the_tiny_tower():
    config = QMoPConfig(num_visual_tokens=64, tower_pruning_schedule="qg_vtc")
    assert config.tower_pruning_plan == [(12, 492), (14, 408), (16, 324), (18, 240), (20, 156), (22, 72)]
    assert config.num_tower_patches == 72 and config.uses_query
    tiny = build_tiny(num_visual_tokens=4, tower_pruning_schedule="qg_vtc")[0].config
    assert tiny.tower_pruning_plan == [(1, 8)]  # 2 layers run: one step, at the feature layer, keeping 64 / 8
    assert QMoPConfig(num_visual_tokens=64).tower_pruning_plan == []


def test_config_round_trip(tmp_path):
    config = build_tiny(num_visual_tokens=9, tower_pruning_score="cls_attention", tower_pruning_recycle=False,
                        **TWO_STEPS)[0].config
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tower_pruning_layers"] == [0, 1] and saved["tower_pruning_keep"] == [40, 20]
    assert saved["tower_pruning_score"] == "cls_attention" and saved["tower_pruning_recycle"] is False
    reloaded = QMoPConfig.from_pretrained(tmp_path)
    assert reloaded.tower_pruning_plan == [(0, 40), (1, 20)]
    assert (reloaded.tower_pruning_score, reloaded.tower_pruning_recycle) == ("cls_attention", False)
    assert reloaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tower_pruning_schedule="every_layer"), "tower_pruning_schedule"),
        (dict(tower_pruning_schedule="qg_vtc", tower_pruning_score="random"), "tower_pruning_score"),
        (dict(tower_pruning_schedule="qg_vtc", tower_pruning_layers=[0]), "read only with"),
        (dict(tower_pruning_schedule="custom"), "non-empty list of integers"),
        (dict(tower_pruning_schedule="custom", tower_pruning_layers=[0, 1], tower_pruning_keep=[40]), "differ in length"),
        (dict(tower_pruning_schedule="custom", tower_pruning_layers=[1, 0], tower_pruning_keep=[40, 20]), "increasing"),
        (dict(tower_pruning_schedule="custom", tower_pruning_layers=[2], tower_pruning_keep=[40]), "run up to"),
        (dict(tower_pruning_schedule="custom", tower_pruning_layers=[0, 1], tower_pruning_keep=[20, 40]), "decreasing"),
        (dict(tower_pruning_schedule="custom", tower_pruning_layers=[0], tower_pruning_keep=[64]), "below the 64"),
        (dict(tower_pruning_schedule="custom", tower_pruning_layers=[0], tower_pruning_keep=[8]), "cannot make more"),
        (dict(tower_pruning_schedule="qg_vtc"), "keeps 8 patches"),  # budget 16 > 64 / 8
        (dict(tower_pruning_schedule="qg_vtc", tower_pruning_recycle=1), "True or False"),
    ],
)
def test_bad_config_raises(kwargs, message):
    from qmop_tools.testing.tiny import build_config

    with pytest.raises((ValueError, TypeError), match=message):
        build_config(build_processor(num_visual_tokens=16), **kwargs)


# ===================================================================================== default off
def test_default_off_builds_nothing_new_and_keeps_the_full_grid(tiny, tiny_checkpoint):
    model, processor = tiny
    config = json.loads(open(os.path.join(tiny_checkpoint, "config.json")).read())
    for field in ("tower_pruning_layers", "tower_pruning_keep"):
        config.pop(field, None)
    config.pop("tower_pruning_schedule", None)  # a checkpoint written before these fields existed
    assert QMoPConfig.from_dict(config).tower_pruning_plan == []
    assert not hasattr(model.model.projector, "tower_pruner")
    saved = load_file(os.path.join(tiny_checkpoint, "model.safetensors"))
    assert not any("tower_pruner" in key for key in saved)
    inputs = processor(images=make_image(seed=3), text=PROMPTS[0])
    base = model.model
    with torch.no_grad():
        hidden, layer_input, layer = base.get_vision_features(inputs["pixel_values"])
        features = base.encode_vision(inputs["pixel_values"])
        full_tower = base.get_image_features(inputs["pixel_values"], inputs["query_input_ids"],
                                             inputs["query_attention_mask"], output_hidden_states=True)
        looped = base.get_image_features(inputs["pixel_values"], inputs["query_input_ids"],
                                         inputs["query_attention_mask"])
    assert hidden.shape[1] == 1 + 64 and features.patch_positions is None and features.feature_layer_kept is None
    assert torch.equal(full_tower.last_hidden_state, looped.last_hidden_state)
    assert torch.equal(full_tower.image_features, looped.image_features)


# ===================================================================================== the tower and the branches
def test_tower_prunes_at_each_step_and_branches_read_the_kept_grid(two_steps):
    model, processor = two_steps
    base = model.model
    seen = []
    handles = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
               for layer in base.vision_tower.encoder.layers]
    inputs = processor(images=[make_image(seed=1), make_image(seed=2)], text=PROMPTS[:2])
    query = base.get_query_embeds(inputs["query_input_ids"], inputs["query_attention_mask"])
    with torch.no_grad():
        features = base.encode_vision(inputs["pixel_values"], query)
        out = model(**inputs)
    for handle in handles:
        handle.remove()
    assert seen[:2] == [1 + 64, 1 + 40]  # layer 1 reads what layer 0 kept; layer 2 never runs
    assert features.hidden.shape == (2, 1 + 20, 32)
    positions = features.patch_positions
    assert positions.shape == (2, 20) and bool((positions.diff(dim=1) > 0).all()) and int(positions.max()) < 64
    assert features.feature_layer_kept.shape == (2, 20) and features.layer_input.shape[1] == 1 + 40
    assert out.image_hidden_states.shape == (2, 9, 32)
    for row, kept in zip(positions, out.kept_patch_indices):  # the pruning branch selects within the tower's set
        if kept[0] >= 0:
            assert set(kept.tolist()) <= set(row.tolist())


def test_recycling_and_score_change_what_the_tower_gives(two_steps):
    model, processor = two_steps
    inputs = processor(images=make_image(seed=5), text=PROMPTS[1])
    query = model.model.get_query_embeds(inputs["query_input_ids"], inputs["query_attention_mask"])
    outputs = {}
    for name, kwargs in [("recycled", {}), ("plain", dict(tower_pruning_recycle=False)),
                         ("cls", dict(tower_pruning_score="cls_attention"))]:
        other = model if not kwargs else build_tiny(num_visual_tokens=9, pruning_score="question_relevance",
                                                    pruning_recycle=True, **TWO_STEPS, **kwargs)[0]
        with torch.no_grad():
            outputs[name] = other.model.encode_vision(inputs["pixel_values"], query)
    recycled, plain, cls = outputs["recycled"], outputs["plain"], outputs["cls"]
    assert not torch.allclose(recycled.hidden, plain.hidden)  # Eq. 5 added the dropped patches
    assert not torch.equal(recycled.patch_positions, cls.patch_positions)


def test_dense_and_routed_projector_agree_on_a_partial_grid(two_steps):
    model, processor = two_steps
    base = model.model
    inputs = processor(images=[make_image(seed=s) for s in range(3)], text=PROMPTS)
    query = base.get_query_embeds(inputs["query_input_ids"], inputs["query_attention_mask"])
    with torch.no_grad():
        features = base.encode_vision(inputs["pixel_values"], query)
        scores, attention = base.pruning_scores(features.layer_input, features.feature_layer, query,
                                                features.feature_layer_kept)
        full_scores, full_attention = base.pruning_scores(features.layer_input, features.feature_layer, query)
        kept = features.feature_layer_kept[0]
        assert scores.shape == (3, 20) and attention.shape == (3, 20, 20)
        assert torch.equal(scores[0], full_scores[0, kept]) and torch.equal(attention[0], full_attention[0][kept][:, kept])
        args = (features.hidden[:, 1:], features.hidden[:, 0], query, 9)
        kwargs = dict(pruning_scores=scores, patch_attention=attention, patch_positions=features.patch_positions)
        dense = base.projector(*args, dense=True, **kwargs)
        routed = base.projector(*args, dense=False, **kwargs)
        through_model = base.get_image_features(inputs["pixel_values"], inputs["query_input_ids"],
                                                inputs["query_attention_mask"], num_visual_tokens=9)
    torch.testing.assert_close(dense.image_features, routed.image_features)
    assert torch.equal(dense.kept_patch_indices, routed.kept_patch_indices)
    torch.testing.assert_close(through_model.image_features, routed.image_features)


def test_masked_pooling_averages_kept_patches_per_cell_and_fills_empty_cells_with_the_mean():
    torch.manual_seed(0)
    patches = torch.randn(2, 16, 3)  # a 4x4 grid
    everything = torch.arange(16).expand(2, -1)
    torch.testing.assert_close(pool_patch_grid(patches, 2, everything, 4), pool_patch_grid(patches, 2))
    positions = torch.tensor([[0, 1, 5, 15], [2, 3, 6, 7]])  # image 0: cells 0 and 3; image 1: cell 1 only
    kept = patches.gather(1, positions.unsqueeze(-1).expand(-1, -1, 3))
    pooled = pool_patch_grid(kept, 2, positions, 4)  # (2, 4, 3), cells in raster order
    torch.testing.assert_close(pooled[0, 0], kept[0, :3].mean(0))
    torch.testing.assert_close(pooled[0, 3], kept[0, 3])
    torch.testing.assert_close(pooled[0, 1], kept[0].mean(0))  # empty cell: mean of the kept patches
    torch.testing.assert_close(pooled[1, 1], kept[1].mean(0))
    torch.testing.assert_close(pooled[1, 2], kept[1].mean(0))


def test_select_patches_recycles_dropped_tokens_by_attention():
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, -4.0]]])  # (1, 4, 2)
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.05]])
    attention = torch.full((1, 4, 4), 0.25)
    attention[0, 1] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    tokens, kept = select_patches(patches, scores, attention, 2, straight_through=False)
    assert kept.tolist() == [[1, 2]]  # top-2 by score, in raster order
    expected_1 = patches[0, 1] + 0.1 * patches[0, 0] + 0.4 * patches[0, 3]  # Eq. 5: only dropped 0 and 3 recycled
    expected_2 = patches[0, 2] + 0.25 * patches[0, 0] + 0.25 * patches[0, 3]
    torch.testing.assert_close(tokens[0], torch.stack([expected_1, expected_2]))
    plain, _ = select_patches(patches, scores, None, 2, straight_through=False)
    assert torch.equal(plain[0], patches[0, [1, 2]])


def test_budget_above_the_kept_patches_is_an_error(two_steps):
    model, processor = two_steps
    inputs = processor(images=make_image(), text=PROMPTS[0])
    with pytest.raises(ValueError, match="more than the 20 patches left by tower pruning"):
        model.model.get_image_features(inputs["pixel_values"], inputs["query_input_ids"],
                                       inputs["query_attention_mask"], num_visual_tokens=25)
    with pytest.raises(ValueError, match="encode_vision"):
        model.model.get_vision_features(inputs["pixel_values"])
    with pytest.raises(ValueError, match="tower pruning never does"):
        model.model.get_image_features(inputs["pixel_values"], inputs["query_input_ids"],
                                       inputs["query_attention_mask"], output_hidden_states=True)


# ===================================================================================== generation
@pytest.mark.parametrize("schedule", ["qg_vtc", "two_steps"])
def test_left_padded_batch_equals_single_samples(two_steps, schedule):
    model, processor = two_steps if schedule == "two_steps" else build_tiny(num_visual_tokens=4,
                                                                            tower_pruning_schedule="qg_vtc")
    images = [make_image(seed=s, width=30 + 10 * s) for s in range(3)]
    batch = processor(images=images, text=PROMPTS)
    assert (batch["attention_mask"][:, 0] == 0).any()  # really padded
    batched = _greedy(model, batch)
    for i in range(3):
        assert torch.equal(batched[i], _greedy(model, processor(images=images[i], text=PROMPTS[i]))[0]), i


def test_question_changes_which_patches_the_tower_keeps(two_steps):
    model, processor = two_steps
    image = make_image(seed=4)
    kept = []
    for question in ("What colour is the circle?", "How many people stand on the left, behind the red car?"):
        inputs = processor(images=image, text=f"USER: <image>\n{question} ASSISTANT:")
        query = model.model.get_query_embeds(inputs["query_input_ids"], inputs["query_attention_mask"])
        with torch.no_grad():
            kept.append(model.model.encode_vision(inputs["pixel_values"], query).patch_positions)
    assert not torch.equal(kept[0], kept[1])


# ===================================================================================== save / reload, device_map, 4-bit
@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tower") / "qmop-tiny-tower"), num_visual_tokens=9,
                                **TWO_STEPS)


@pytest.fixture(scope="module")
def pruned_reference(pruned_checkpoint):
    from processing_qmop import QMoPProcessor

    processor = QMoPProcessor.from_pretrained(pruned_checkpoint)
    inputs = processor(images=make_image(seed=2), text=PROMPTS[0])
    model = QMoPForConditionalGeneration.from_pretrained(pruned_checkpoint).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    return inputs, logits, _greedy(model, inputs)


def test_save_and_reload_through_auto_classes(pruned_checkpoint, pruned_reference):
    from transformers import AutoConfig, AutoModelForImageTextToText

    inputs, logits, tokens = pruned_reference
    config = AutoConfig.from_pretrained(pruned_checkpoint, trust_remote_code=True)
    assert config.tower_pruning_plan == [(0, 40), (1, 20)]
    model = AutoModelForImageTextToText.from_pretrained(pruned_checkpoint, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules")  # the saved remote code, not this checkout
    assert any(".tower_pruner.question_proj." in k for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
    assert torch.equal(_greedy(model, inputs), tokens)


@pytest.mark.parametrize("device_map", ["auto", "cpu"])
def test_device_map(pruned_checkpoint, pruned_reference, device_map, tmp_path):
    inputs, _, tokens = pruned_reference
    model = QMoPForConditionalGeneration.from_pretrained(pruned_checkpoint, device_map=device_map).eval()
    assert torch.equal(_greedy(model, inputs), tokens)


def test_explicit_device_map_with_disk_offload(pruned_checkpoint, pruned_reference, tmp_path):
    inputs, _, tokens = pruned_reference
    device_map = {
        "model.vision_tower": "cpu", "model.text_encoder": "cpu", "model.projector": "disk",
        "model.language_model": "cpu", "lm_head": "cpu",
    }
    model = QMoPForConditionalGeneration.from_pretrained(
        pruned_checkpoint, device_map=device_map, offload_folder=str(tmp_path)
    ).eval()
    assert torch.equal(_greedy(model, inputs), tokens)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_4bit_keeps_the_tower_pruner_unquantized(tmp_path_factory):
    from transformers import BitsAndBytesConfig

    folder = save_tiny_checkpoint(str(tmp_path_factory.mktemp("bnb") / "tower-bnb"), num_visual_tokens=9, width=64,
                                  **TWO_STEPS)  # width 64: bitsandbytes' CPU 4-bit kernels need it (test_deployment)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = QMoPForConditionalGeneration.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)
    quantized = [name for name, module in model.named_modules() if type(module).__name__ == "Linear4bit"]
    assert quantized and all(name.startswith("model.language_model.layers.") for name in quantized)
    pruner = model.model.projector.tower_pruner.question_proj
    assert type(pruner.linear_1).__name__ == "Linear" and pruner.linear_1.weight.dtype == torch.float32
    processor = build_processor(num_visual_tokens=9)
    assert _greedy(model.eval(), processor(images=make_image(), text=PROMPTS[0])).shape == (1, 5)


# ===================================================================================== training
def test_training_step_updates_the_question_mlp(tmp_path):
    from test_training import write_dataset

    from qmop_tools.train import main

    base = save_tiny_checkpoint(str(tmp_path / "base"), num_visual_tokens=4, branches=["pooling", "resampler"],
                                tower_pruning_schedule="qg_vtc")
    data, images = write_dataset(str(tmp_path))
    result = main([
        "--model_name_or_path", base, "--stage", "2", "--data_path", data, "--image_folder", images,
        "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
        "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu",
        "--seed", "0", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
    ])
    before = load_file(os.path.join(base, "model.safetensors"))
    after = load_file(os.path.join(result.output_dir, "model.safetensors"))
    pruner = [key for key in before if key.startswith("model.projector.tower_pruner.question_proj.")]
    assert len(pruner) == 4
    assert all(not torch.equal(before[key], after[key]) for key in pruner), "the question MLP did not train"
    assert torch.equal(before["model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"],
                       after["model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"])


# ===================================================================================== FLOPs
def test_7b_flops_on_meta_with_tower_pruning_alone_and_composed():
    from qmop_tools.bench.runner import BenchSettings, run_benchmark

    results = run_benchmark(BenchSettings(preset="7b", device="meta", budgets=[64], tower_pruning="qg_vtc"),
                            log=lambda *_: None)
    records = {r["name"]: r for r in results["variants"]}
    plain, composed, alone = records["QMoP M=64"], records["QMoP+qg_vtc M=64"], records["qg_vtc (pooling) M=64"]
    for record in records.values():  # the analytic count (flops.py) explains every counted FLOP, pruning steps too
        assert record["flops"]["counted_over_analytic"] == pytest.approx(1.0, rel=1e-5)
    tower = {name: r["flops"]["counted"]["vision_tower"] for name, r in records.items()}
    assert tower["QMoP+qg_vtc M=64"] == tower["qg_vtc (pooling) M=64"] < 0.85 * tower["QMoP M=64"]
    assert composed["flops_vs_llava"] < plain["flops_vs_llava"] and alone["flops_vs_llava"] < composed["flops_vs_llava"]
    assert [t["value"] for t in results["targets"][:2]] == [None, plain["flops_vs_llava"]]  # targets read plain QMoP


def test_smoke_benchmark_times_the_tower_pruning_variants_on_cpu():
    from qmop_tools.bench.runner import BenchSettings, run_benchmark

    results = run_benchmark(BenchSettings(preset="smoke", budgets=[4], tower_pruning="qg_vtc", components=False),
                            log=lambda *_: None)
    names = [r["name"] for r in results["variants"]]
    assert names == ["LLaVA-1.5 (64)", "QMoP M=4", "QMoP+qg_vtc M=4", "qg_vtc (pooling) M=4"]
    for record in results["variants"]:
        flops = record["flops"]
        assert flops["whole_forward"] == flops["counted"]["total"]  # the real forward runs what the parts count
        assert set(record["by_batch"]) == {"1", "2"} and record["by_batch"]["1"]["ttft_s"] > 0


# ===================================================================================== conversion


def test_conversion_initialises_the_question_mlp(sources):  # noqa: F811
    from transformers import AutoModelForImageTextToText

    from conversion import convert

    settings = conversion_settings(sources, "tower-qg-vtc", num_visual_tokens=4,
                                   config_overrides=dict(tower_pruning_schedule="qg_vtc"))
    report = convert(settings)
    pruner_keys = [k for k in report.fresh_keys if ".tower_pruner.question_proj." in k]
    assert len(pruner_keys) == 4  # freshly initialised, seeded, and reported as such
    config = json.loads(open(os.path.join(report.output, "config.json")).read())
    assert config["tower_pruning_schedule"] == "qg_vtc"
    model = AutoModelForImageTextToText.from_pretrained(report.output, trust_remote_code=True)
    assert model.config.tower_pruning_plan == [(1, 8)]
    assert float(model.model.projector.tower_pruner.question_proj.linear_1.weight.detach().std()) > 0
