import pytest
from transformers import CLIPVisionConfig, LlamaConfig

from configuration_qmop import QMoPConfig

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=48, patch_size=6)


def test_defaults_are_llava_15_7b_shapes():
    config = QMoPConfig()
    assert config.model_type == "qmop_llava"
    assert config.num_patches == 576 and config.num_visual_tokens == 144
    assert config.branches == ["pooling", "resampler", "pruning"]
    assert isinstance(config.vision_config, CLIPVisionConfig) and config.vision_config.hidden_size == 1024
    assert config.text_encoder_config.hidden_size == 768 and config.text_encoder_config.max_position_embeddings == 77
    assert isinstance(config.text_config, LlamaConfig) and config.text_config.hidden_size == 4096
    assert config.image_token_id == 32000 and config.vision_feature_layer == -2
    assert config.vision_feature_hidden_state_index == 23  # penultimate of 24 layers: the last layer is never run
    assert config.tie_word_embeddings is False
    assert config.uses_router and config.uses_query


def test_sub_configs_accept_dicts_and_round_trip():
    config = QMoPConfig(
        vision_config=TINY_VISION,
        text_config={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4},
        num_visual_tokens=16,
        branches=["pruning", "pooling"],
        router_top_k=1,
    )
    assert config.branches == ["pooling", "pruning"]  # canonical order
    restored = QMoPConfig.from_dict(config.to_dict())
    assert restored.to_dict() == config.to_dict()
    assert restored.vision_config.hidden_size == 32 and restored.text_config.hidden_size == 32


def test_any_causal_lm_text_config():
    config = QMoPConfig(vision_config=TINY_VISION, num_visual_tokens=16, text_config={"model_type": "qwen2", "hidden_size": 32})
    assert config.text_config.model_type == "qwen2"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_visual_tokens": 150}, "num_visual_tokens"),  # not a square
        ({"num_visual_tokens": 81}, "num_visual_tokens"),  # larger than 64 patches
        ({"num_visual_tokens": 0}, "num_visual_tokens"),
        ({"branches": ["pooling", "zoom"]}, "branches"),
        ({"branches": []}, "branches"),
        ({"branches": "pooling"}, "branches"),
        ({"branches": ["pooling", "pooling"]}, "branches"),
        ({"branches": ["pooling", "pruning"], "router_top_k": 3}, "router_top_k"),
        ({"router_top_k": 0}, "router_top_k"),
        ({"router_min_temperature": 0.0}, "router_min_temperature"),
        ({"router_temperature": 0.05}, "router_min_temperature"),
        ({"router_mode": "text"}, "router_mode"),
        ({"pruning_score": "entropy"}, "pruning_score"),
        ({"router_temperature_schedule": "step"}, "router_temperature_schedule"),
        ({"resampler_query_init": "zeros"}, "resampler_query_init"),
        ({"vision_feature_layer": 9}, "vision_feature_layer"),
        ({"vision_feature_layer": 0}, "vision_feature_layer"),  # embeddings cannot be pruned by attention
        ({"resampler_num_heads": 5}, "resampler_num_heads"),
        ({"query_max_length": 100}, "query_max_length"),
        ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef"),
        ({"router_z_loss_coef": -0.1}, "router_z_loss_coef"),
        ({"router_eval_temperature": 0.0}, "router_eval_temperature"),
        ({"router_logit_cap": -2.0}, "router_logit_cap"),
    ],
)
def test_bad_combinations_raise_naming_the_field(kwargs, field):
    settings = dict(vision_config=TINY_VISION, num_visual_tokens=16)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=field):
        QMoPConfig(**settings)


def test_patch_grid_must_divide():
    with pytest.raises(ValueError, match="patch_size"):
        QMoPConfig(vision_config=dict(TINY_VISION, image_size=50), num_visual_tokens=16)


def test_single_branch_and_uniform_need_no_router():
    single = QMoPConfig(vision_config=TINY_VISION, num_visual_tokens=16, branches=["pooling"])  # top-k follows
    assert not single.uses_router and not single.uses_query and single.router_top_k == 1
    assert QMoPConfig(vision_config=TINY_VISION, num_visual_tokens=16).router_top_k == 2
    with pytest.raises(ValueError, match="router_top_k"):  # an explicit value is still checked
        QMoPConfig(vision_config=TINY_VISION, num_visual_tokens=16, branches=["pooling"], router_top_k=2)
    uniform = QMoPConfig(vision_config=TINY_VISION, num_visual_tokens=16, router_mode="uniform")
    assert not uniform.uses_router and not uniform.uses_query
    question_pruning = QMoPConfig(
        vision_config=TINY_VISION, num_visual_tokens=16, branches=["pruning"], router_top_k=1,
        pruning_score="question_relevance",
    )
    assert question_pruning.uses_query  # the pruning score itself reads the question
