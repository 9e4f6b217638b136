"""vLLM input processing for QMoP-LLaVA: images, their questions and the token budget.

vLLM's renderer tokenizes the prompt first and then hands this processor the token ids and the images; the HF
processor itself never sees the prompt. QMoP's projector, however, depends on the user's question, and vLLM
caches processed images and their encoder outputs by a per-image hash. So, per request:

1. `apply` settles each image's question (`mm_processor_kwargs["queries"]`, or read off the prompt with the
   checkpoint's own `extract_question`, as QMoPProcessor does) and the budget M, and records both in the
   processor kwargs;
2. `_get_mm_hashes` hashes each image together with its own question and M, so the same picture asked something
   else is a different cache entry (and prefix-cache block), while the same picture with the same question is
   reused across requests;
3. `_call_hf_processor` runs the checkpoint's QMoPProcessor on the images that missed the cache, with their
   questions: `pixel_values`, one unpadded `query_input_ids` row and the budget per image;
4. each `<image>` token of the prompt becomes M placeholders, which the model fills with the image's M tokens;
   a prompt without the tokenizer's BOS gets it, as QMoPProcessor's prompts always have it.
"""

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property

import torch
from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from .remote import remote_module

QUERIES_KEY = "queries"  # mm_processor_kwargs: one question per image, or one string for all images of the prompt
BUDGET_KEY = "num_visual_tokens"  # mm_processor_kwargs: M, a perfect square at most the number of patches


class QMoPProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_budget(self, mm_kwargs: Mapping[str, object] | None = None) -> int:
        """M for a request: its `num_visual_tokens`, else the engine's `--mm-processor-kwargs` default, else the
        checkpoint processor's own budget. A budget the checkpoint cannot use raises a ValueError here, before
        anything is processed."""
        merged = self.ctx.get_merged_mm_kwargs(mm_kwargs or {})
        budget = merged.get(BUDGET_KEY)
        if budget is None:
            budget = self.get_hf_processor().num_visual_tokens
        self.get_hf_config().validate_num_visual_tokens(budget, f"mm_processor_kwargs['{BUDGET_KEY}']")
        return budget

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # The largest budget a request may ask for: every patch (576 = LLaVA-1.5's count for CLIP-L/336).
        return {"image": self.get_hf_config().num_patches}

    def get_image_size_with_most_features(self) -> ImageSize:
        side = self.get_hf_config().vision_config.image_size
        return ImageSize(width=side, height=side)


class QMoPDummyInputsBuilder(BaseDummyInputsBuilder[QMoPProcessingInfo]):
    """Images for vLLM's start-up profiling (processed at the largest budget, see `get_dummy_inputs`)."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        size = self.info.get_image_size_with_most_features()
        images = self._get_dummy_images(
            width=size.width, height=size.height, num_images=mm_counts.get("image", 0),
            overrides=mm_options.get("image"),
        )
        return {"image": images}


class QMoPMultiModalProcessor(BaseMultiModalProcessor[QMoPProcessingInfo]):
    def get_dummy_inputs(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions):
        """Start-up profiling processes the dummy images at the largest budget, as `get_mm_max_tokens_per_item`
        declares."""
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        return replace(inputs, hf_processor_mm_kwargs={BUDGET_KEY: self.info.get_hf_config().num_patches})

    # ------------------------------------------------------------------------------------------------ questions
    def apply(self, inputs, timing_ctx):
        """Settle each image's question and the budget before anything is hashed, cached or processed."""
        num_images = inputs.mm_data_items.get_count("image", strict=False)
        if num_images:
            if not isinstance(inputs.mm_data_items["image"], ImageProcessorItems):
                raise ValueError(
                    "QMoP-LLaVA needs the pictures themselves: the router and the pruning branch read the vision "
                    "tower's CLS token and attention, so precomputed image embeddings cannot be served."
                )
            kwargs = dict(inputs.hf_processor_mm_kwargs)
            kwargs[QUERIES_KEY] = self._questions(inputs.prompt, kwargs.get(QUERIES_KEY), num_images)
            kwargs[BUDGET_KEY] = self.info.get_budget(kwargs)
            inputs = replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super().apply(inputs, timing_ctx)

    def _questions(self, prompt: list[int], queries, num_images: int) -> tuple[str, ...]:
        """One question per image: `queries` as given (a string is shared by all images), else the text of the
        user turn holding each image, found with the checkpoint's own `extract_question`."""
        if queries is None:
            tokenizer = self.info.get_tokenizer()
            image_token = self.info.get_hf_processor().image_token
            ids = list(prompt)
            if ids and ids[0] == tokenizer.bos_token_id:  # "<s>USER:" would hide the first role marker
                ids = ids[1:]
            text = tokenizer.decode(ids)
            extract = remote_module(self.info.get_hf_config(), "processing_qmop").extract_question
            return tuple(extract(text, image_token, k) for k in range(num_images))
        if isinstance(queries, str):
            return (queries,) * num_images
        if not isinstance(queries, (list, tuple)) or not all(q is None or isinstance(q, str) for q in queries):
            raise ValueError(
                f"mm_processor_kwargs['{QUERIES_KEY}'] must be a string or a list of strings, got {queries!r:.200}."
            )
        if len(queries) != num_images:
            raise ValueError(
                f"mm_processor_kwargs['{QUERIES_KEY}'] has {len(queries)} questions for {num_images} images; give one "
                "per image, or one string for all."
            )
        return tuple(q or "" for q in queries)

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        """Start the prompt with BOS when the LLM tokenizer adds one itself (Llama's does), as QMoPProcessor's
        prompts always do. vLLM's chat endpoint tokenizes the rendered chat template without them (it expects the
        template to hold BOS), and LLaVA-1.5's template does not: without this, served chats would run a prompt the
        model never saw in training and answer differently from transformers."""
        bos = self._bos_token_id
        if bos is not None and prompt[:1] != [bos]:
            return [bos, *prompt]
        return prompt

    @cached_property
    def _bos_token_id(self) -> int | None:
        """BOS if the tokenizer puts it in front of every text it encodes, else None."""
        tokenizer = self.info.get_tokenizer()
        bos = tokenizer.bos_token_id
        return bos if bos is not None and tokenizer.encode("", add_special_tokens=True)[:1] == [bos] else None

    # ------------------------------------------------------------------------------------------------ cache
    def _get_mm_hashes(self, inputs):
        """Per image: the image (or its client-given uuid), its own question, and the request's other processor
        kwargs (budget included). vLLM's default would hash every image with the whole kwargs, so an image's
        entry would change with the questions of the other images of the prompt."""
        if inputs.mm_data_items.get_count("image", strict=False) == 0:
            return super()._get_mm_hashes(inputs)
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        questions = kwargs.pop(QUERIES_KEY)
        algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
        items = inputs.mm_data_items["image"].get_all_items_for_hash()
        uuids = (inputs.mm_uuid_items or {}).get("image") or [None] * len(items)
        media_io = inputs.media_io_kwargs.get("image") or {}
        hashes = []
        for item, uuid, question in zip(items, uuids, questions):
            factors = {"mm_processor_kwargs": {**kwargs, QUERIES_KEY: question}}
            if media_io:
                factors["media_io_kwargs"] = {"image": media_io}
            image = uuid if uuid is not None else item
            hashes.append(MultiModalHasher.hash_kwargs(algorithm, model_id=self.info.model_id, image=image, **factors))
        return {"image": hashes}

    def _get_cache_missing_processor_kwargs(self, inputs, mm_is_cached):
        """Only the questions of the images that missed the cache (the others are not processed again)."""
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        if QUERIES_KEY in kwargs and "image" in mm_is_cached:
            missing = [not cached for cached in mm_is_cached["image"]]
            kwargs[QUERIES_KEY] = tuple(q for q, wanted in zip(kwargs[QUERIES_KEY], missing) if wanted)
        return kwargs

    # ------------------------------------------------------------------------------------------------ HF processor
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """The checkpoint's QMoPProcessor on the images alone (one `<image>` each) with their questions, so pixel
        values and question tokens come from the project's own processing code."""
        images = list(hf_data.get("images") or [])
        kwargs = self.info.ctx.get_merged_mm_kwargs(hf_kwargs)
        questions = list(kwargs.pop(QUERIES_KEY))
        budget = kwargs.pop(BUDGET_KEY)
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions for {len(images)} images reached the processor.")
        processor = self.info.get_hf_processor()
        out = processor(
            images=images, text=processor.image_token * len(images), queries=questions, num_visual_tokens=budget,
            **{**kwargs, "return_tensors": "pt"},
        )
        mask = out["query_attention_mask"].bool()  # (n, L)
        # Each image's question unpadded: an item must not depend on the other images of the call (cache).
        query_ids = [ids[keep] for ids, keep in zip(out["query_input_ids"], mask)]
        budgets = torch.full((len(images),), budget, dtype=torch.long)  # (n,)
        return BatchFeature({"pixel_values": out["pixel_values"], "query_input_ids": query_ids, BUDGET_KEY: budgets})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "pixel_values": MultiModalFieldConfig.batched("image"),
            "query_input_ids": MultiModalFieldConfig.batched("image"),
            BUDGET_KEY: MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_id
        budget = self.info.get_budget(hf_processor_mm_kwargs)
        return [PromptReplacement(modality="image", target=[image_token_id], replacement=[image_token_id] * budget)]
