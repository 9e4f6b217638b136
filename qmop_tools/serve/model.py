"""QMoP-LLaVA as a vLLM model.

- Vision side: the checkpoint's own `QMoPModel` code (CLIP vision tower, CLIP text encoder, QMoP projector and
  router) without its language model, run as plain PyTorch in vLLM's encoder step. Nothing of QMoP is
  re-implemented here, so vLLM computes the same visual tokens as transformers.
- Language model: vLLM's own registered implementation of `config.text_config` (Llama/Vicuna for LLaVA-1.5),
  with paged attention and vLLM's kernels.
- Images join the prompt the vLLM way: `embed_multimodal` returns one (M, D) tensor per image and vLLM scatters
  them over the M placeholder tokens that `processing.py` put into the prompt.
"""

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from .processing import QMoPDummyInputsBuilder, QMoPMultiModalProcessor, QMoPProcessingInfo
from .remote import remote_module

IMAGE_PLACEHOLDER = "<image>"  # what a chat template puts where an image goes (LLaVA-1.5's template)


def build_vision_side(config) -> nn.Module:
    """The checkpoint's `QMoPModel` with only its vision tower, text encoder and projector: the same module names
    (so checkpoint keys map one to one) and the same `get_image_features`, without a second language model."""
    modeling = remote_module(config, "modeling_qmop")

    class QMoPVisionSide(modeling.QMoPModel):
        def __init__(self, config):
            modeling.QMoPPreTrainedModel.__init__(self, config)  # QMoPModel.__init__ would build the LLM too
            self.vision_tower, self.text_encoder = modeling._build_clip_towers(config)
            self.projector = modeling.QMoPProjector(config)

    return QMoPVisionSide(config)


def _per_image(value) -> list[torch.Tensor]:
    """A batched multimodal field as one tensor per image (vLLM stacks equal shapes, and lists unequal ones)."""
    return list(value.unbind(0)) if isinstance(value, torch.Tensor) else list(value)


@MULTIMODAL_REGISTRY.register_processor(
    QMoPMultiModalProcessor, info=QMoPProcessingInfo, dummy_inputs=QMoPDummyInputsBuilder
)
class QMoPForConditionalGeneration(nn.Module, SupportsMultiModal):
    # checkpoint key prefix -> this module's attribute path
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
            "model.vision_tower.": "vision.vision_tower.",
            "model.text_encoder.": "vision.text_encoder.",
            "model.projector.": "vision.projector.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError(f"QMoP-LLaVA takes images only, not {modality!r}.")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if getattr(config, "llm_pruning_layer", None) is not None:
            raise ValueError(
                f"This checkpoint prunes visual tokens inside the language model (`llm_pruning_layer`="
                f"{config.llm_pruning_layer}): its later layers hold fewer KV entries than the first ones, which "
                "vLLM's paged KV cache does not allow. Serve it without that step, e.g. "
                "LLM(..., hf_overrides={\"llm_pruning_layer\": None}) (the projector and tower pruning still apply), "
                "or generate with transformers."
            )
        self.config = config
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            self.vision = build_vision_side(config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ------------------------------------------------------------------------------------------------ images
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One (M, D) tensor per image, in the order of the images in the batch. Images are compressed in groups
        of equal budget M (a request may ask for its own M); within a group, in one call, as transformers does."""
        if kwargs.get("pixel_values") is None:
            return []
        pixel_values = _per_image(kwargs["pixel_values"])  # N x (3, H, W)
        budgets = [int(m) for m in _per_image(kwargs["num_visual_tokens"])]
        queries = _per_image(kwargs["query_input_ids"])  # N x (L_i,), unpadded
        if not len(pixel_values) == len(budgets) == len(queries):
            raise ValueError(
                f"{len(pixel_values)} images, {len(budgets)} budgets and {len(queries)} questions reached the model; "
                "the processor gives one of each per image."
            )
        self.vision.eval()  # the router adds Gumbel noise in training mode
        features: list[torch.Tensor | None] = [None] * len(pixel_values)
        for budget in sorted(set(budgets)):
            rows = [i for i, m in enumerate(budgets) if m == budget]
            query_ids, query_mask = self._pad_queries([queries[i] for i in rows], pixel_values[0].device)
            out = self.vision.get_image_features(
                torch.stack([pixel_values[i] for i in rows]), query_ids, query_mask, budget, return_dict=True
            )
            for i, tokens in zip(rows, out.pooler_output):  # (M, D) each
                features[i] = tokens
        return features

    def _pad_queries(self, rows: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask (n, L) from unpadded question rows, as the HF processor pads them (CLIP pools at
        the first EOS, so padding comes after it and its id does not matter)."""
        length = max(int(r.numel()) for r in rows)
        pad = self.config.text_encoder_config.pad_token_id or 0
        ids = torch.full((len(rows), length), pad, dtype=torch.long, device=device)  # (n, L)
        mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)  # (n, L)
        for i, row in enumerate(rows):
            ids[i, : row.numel()] = row.flatten()
            mask[i, : row.numel()] = 1
        return ids, mask

    # ------------------------------------------------------------------------------------------------ language model
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
