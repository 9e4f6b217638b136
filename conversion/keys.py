"""Checkpoint key renaming: the rule tables for every source layout and the functions that apply them.

Every source key is renamed by exactly one anchored regular expression (`KeyRule`); a key that matches no rule or
more than one is an error, so the result never depends on rule order. A rule whose target is None drops the key
and says why. LLaVA's projector is mapped to the pseudo prefix `@projector.` and copied into every branch's expert
MLP when the model is assembled (`expert_keys`).
"""

import re
from dataclasses import dataclass
from typing import Optional

from conversion.settings import ConversionError

PROJECTOR = "@projector."  # pseudo prefix: LLaVA's projector, copied into every branch's expert MLP


@dataclass(frozen=True)
class KeyRule:
    """An anchored regex; `target` is a format string over its named groups, or None to drop the key."""

    pattern: str
    target: Optional[str]
    reason: str = ""

    def __post_init__(self):
        if not (self.pattern.startswith("^") and self.pattern.endswith("$")):
            raise ValueError(f"KeyRule patterns must be anchored with ^...$: {self.pattern!r}")

    @property
    def regex(self) -> re.Pattern:
        return re.compile(self.pattern)


_NOT_POSITION_IDS = r"(?!embeddings\.position_ids$)"
POSITION_IDS_REASON = "buffer recomputed by the model"

# llava-hf: the on-disk layout (4.x save, Hub repos), 4.57's in-memory layout and 5.x's in-memory layout.
LLAVA_HF_RULES = (
    KeyRule(
        r"^(?:model\.)?vision_tower\.(?!(?:vision_model\.)?embeddings\.position_ids$)(?:vision_model\.)?(?P<rest>.+)$",
        "model.vision_tower.{rest}",
    ),
    KeyRule(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?embeddings\.position_ids$", None, POSITION_IDS_REASON),
    KeyRule(
        r"^(?:model\.)?multi_modal_projector\.linear_(?P<i>[12])\.(?P<param>weight|bias)$", PROJECTOR + "linear_{i}.{param}"
    ),
    KeyRule(r"^language_model\.model\.(?P<rest>.+)$", "model.language_model.{rest}"),
    KeyRule(r"^model\.language_model\.(?P<rest>.+)$", "model.language_model.{rest}"),
    KeyRule(r"^(?:language_model\.)?lm_head\.weight$", "lm_head.weight"),
)

# liuhaotian/llava-v1.5-*: LlavaLlamaForCausalLM (a LlamaForCausalLM with `model.mm_projector` and, only when the
# tower was trained, `model.vision_tower.vision_tower.vision_model`).
ORIGINAL_RULES = (
    KeyRule(r"^model\.embed_tokens\.weight$", "model.language_model.embed_tokens.weight"),
    KeyRule(r"^model\.layers\.(?P<rest>\d+\.(?!self_attn\.rotary_emb\.).+)$", "model.language_model.layers.{rest}"),
    KeyRule(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$", None, "rotary buffer recomputed by the model"),
    KeyRule(r"^model\.norm\.weight$", "model.language_model.norm.weight"),
    KeyRule(r"^lm_head\.weight$", "lm_head.weight"),
    KeyRule(r"^model\.mm_projector\.0\.(?P<param>weight|bias)$", PROJECTOR + "linear_1.{param}"),
    KeyRule(r"^model\.mm_projector\.2\.(?P<param>weight|bias)$", PROJECTOR + "linear_2.{param}"),
    KeyRule(
        rf"^model\.vision_tower\.vision_tower\.vision_model\.(?P<rest>{_NOT_POSITION_IDS}.+)$", "model.vision_tower.{rest}"
    ),
    KeyRule(r"^model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids$", None, POSITION_IDS_REASON),
)

# CLIPModel (`text_model.*`, `vision_model.*`), 4.x CLIPTextModel (`text_model.*`), 5.x CLIPTextModel (unwrapped).
CLIP_TEXT_RULES = (
    KeyRule(rf"^text_model\.(?P<rest>{_NOT_POSITION_IDS}.+)$", "model.text_encoder.{rest}"),
    KeyRule(r"^(?P<rest>(?:embeddings\.(?!position_ids$)|encoder\.|final_layer_norm\.).+)$", "model.text_encoder.{rest}"),
    KeyRule(r"^(?:text_model\.)?embeddings\.position_ids$", None, POSITION_IDS_REASON),
    KeyRule(r"^text_projection\.weight$", None, "CLIP's contrastive head: QMoP reads the pooled EOS state"),
    KeyRule(r"^logit_scale$", None, "CLIP's contrastive temperature"),
)
CLIP_VISION_RULES = (
    KeyRule(rf"^vision_model\.(?P<rest>{_NOT_POSITION_IDS}.+)$", "model.vision_tower.{rest}"),
    KeyRule(r"^vision_model\.embeddings\.position_ids$", None, POSITION_IDS_REASON),
    KeyRule(r"^visual_projection\.weight$", None, "CLIP's contrastive head"),
)
# 5.x CLIPVisionModel saves unwrapped keys; only used for a separate --vision-tower checkpoint.
CLIP_VISION_UNWRAPPED_RULES = CLIP_VISION_RULES[:2] + (
    KeyRule(
        r"^(?P<rest>(?:embeddings\.(?!position_ids$)|encoder\.|pre_layrnorm\.|post_layernorm\.).+)$",
        "model.vision_tower.{rest}",
    ),
    KeyRule(r"^embeddings\.position_ids$", None, POSITION_IDS_REASON),
    KeyRule(r"^visual_projection\.weight$", None, "CLIP's contrastive head"),
)
# A separate --vision-tower checkpoint: a CLIPModel (its text half unused) or a CLIPVisionModel (4.x or 5.x keys).
SEPARATE_VISION_RULES = CLIP_VISION_UNWRAPPED_RULES + (
    KeyRule(r"^text_model\..+$", None, "the text tower comes from --clip"),
    KeyRule(r"^text_projection\.weight$", None, "CLIP's contrastive head"),
    KeyRule(r"^logit_scale$", None, "CLIP's contrastive temperature"),
)


def map_key(key: str, rules) -> Optional[str]:
    """The target of the one rule matching `key` (None: dropped). Raises when no rule or several rules match."""
    matches = [(rule, m) for rule in rules if (m := rule.regex.match(key))]
    if not matches:
        raise KeyError(key)
    if len(matches) > 1:
        raise ConversionError(f"key {key!r} matches several rules: {[r.pattern for r, _ in matches]}")
    rule, match = matches[0]
    return None if rule.target is None else rule.target.format(**match.groupdict())


def map_keys(keys, rules, source: str) -> dict:
    """{source key: target key or None}; every unmatched key is listed in one error."""
    mapping, unmatched = {}, []
    for key in keys:
        try:
            mapping[key] = map_key(key, rules)
        except KeyError:
            unmatched.append(key)
    if unmatched:
        raise ConversionError(
            f"{len(unmatched)} key(s) of {source} match no conversion rule (is this the right kind of checkpoint?): "
            + ", ".join(sorted(unmatched))
        )
    return mapping


def expert_keys(pseudo_key: str, branches) -> list:
    """`@projector.linear_1.weight` -> the same tensor name in every branch's expert MLP."""
    rest = pseudo_key[len(PROJECTOR) :]
    return [f"model.projector.{branch}_branch.expert.{rest}" for branch in branches]


def is_fresh_key(key: str) -> bool:
    """Weights QMoP adds to LLaVA, initialised at conversion time (everything in the projector but the experts)."""
    return key.startswith("model.projector.") and ".expert." not in key

