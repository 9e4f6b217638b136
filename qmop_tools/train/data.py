"""LLaVA conversation data for QMoP-LLaVA training.

The LLaVA JSON format (LLaVA docs/Finetune_Custom_Data.md) is a list of samples:

    {"id": "000001", "image": "coco/train2017/000001.jpg",          # "image" is absent for text-only samples
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt", "value": "A cat."}, ...]}     # human/gpt turns alternate

Each sample is rendered with a conversation template, tokenised by the QMoP processor (which expands `<image>` to
the M placeholders and tokenises the question for the router's CLIP text encoder) and labelled so that only the
assistant's answers are learned:

    plain      (stage 1)  "<image>{caption}\\n"                                        target: "{caption}\\n"
    vicuna_v1  (stage 2)  "{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
    llava_hf             "USER: <image>\\n{q1} ASSISTANT: {a1}</s>..."   (vicuna_v1 without the system prompt)
                                                                       targets: "{a1}</s>", "{a2}</s>"

Labels are -100 everywhere else (system prompt, questions, role markers, image placeholders, padding). Targets are
found from character spans and the tokenizer's offset mapping, so no tokenisation of fragments has to agree with
the tokenisation of the whole text.

A bad sample (missing or corrupt image, an image without `<image>` in the question, `<image>` without an image, an
empty answer, turns out of order, a sequence that would be cut inside the image) is skipped with a counted warning:
the dataset moves on to the next sample, so the batch size and the number of steps do not change.
"""

import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions that are not learned (the loss ignores them)
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
TemplateName = Literal["plain", "vicuna_v1", "llava_hf"]
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class BadSample(ValueError):
    """A sample that cannot be trained on; `reason` is the short key under which it is counted."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ===================================================================================== templates
@dataclass(frozen=True)
class RenderedConversation:
    text: str  # the whole training text, with one `<image>` per image (not yet expanded to M placeholders)
    answer_spans: tuple  # ((start, end), ...) character spans of the targets in `text`
    query: str  # the question for the router's CLIP text encoder ("" for text-only samples)


@dataclass(frozen=True)
class ConversationTemplate:
    """A LLaVA conversation template (llava/conversation.py: `conv_llava_plain`, `conv_vicuna_v1`).

    `plain`: only the image and the first answer (projector pre-training on captions).
    `two_separators`: "{system}{sep}{ROLE}: {message}{sep or sep2}..." with sep after questions, sep2 (the
    tokenizer's EOS, `</s>` for Vicuna) after answers.
    """

    name: str
    system: str = ""
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    sep: str = " "
    plain: bool = False

    def render(self, rounds: list, image_token: str, eos_token: str, has_image: bool) -> RenderedConversation:
        """`rounds`: [(question, answer), ...] with `<image>` already moved to the front of its question."""
        query = _question_text(rounds[0][0], image_token) if has_image else ""
        if self.plain:
            if not has_image:
                raise BadSample("text_only_in_plain", "the `plain` template (stage 1) needs an image")
            answer = rounds[0][1]
            prefix = image_token
            text = prefix + answer + "\n"
            return RenderedConversation(text, ((len(prefix), len(text)),), query)

        parts, spans, length = [], [], 0

        def add(piece: str, target: bool = False):
            nonlocal length
            if target:
                spans.append((length, length + len(piece)))
            parts.append(piece)
            length += len(piece)

        add(self.system + self.sep if self.system else "")
        for question, answer in rounds:
            add(f"{self.user_role}: {question}{self.sep}{self.assistant_role}: ")
            add(answer + eos_token, target=True)
        return RenderedConversation("".join(parts), tuple(spans), query)


TEMPLATES = {
    "plain": ConversationTemplate(name="plain", plain=True),
    "vicuna_v1": ConversationTemplate(name="vicuna_v1", system=VICUNA_V1_SYSTEM),
    # vicuna_v1 without the system prompt: exactly what `processor.apply_chat_template` renders (llava-hf's prompts,
    # answers closed by `</s>`; tests/test_trl.py checks it),
    # so a model trained with it answers prompts built the way Hub users build them.
    "llava_hf": ConversationTemplate(name="llava_hf"),
}


def get_template(name: str) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"Unknown conversation template {name!r}; choose from {sorted(TEMPLATES)}.")
    return TEMPLATES[name]


def _question_text(question: str, image_token: str) -> str:
    return " ".join(question.replace(image_token, " ").split())


# ===================================================================================== parsing
def parse_conversations(sample: dict, image_token: str, has_image: bool) -> list:
    """[(question, answer), ...] from a LLaVA sample; `<image>` moved to the front of its question as LLaVA's
    `preprocess_multimodal` does. Raises BadSample for anything that cannot be trained on."""
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSample("no_conversations", "`conversations` is missing or empty")
    turns = list(turns)
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or "value" not in turn:
            raise BadSample(
                "malformed_turn",
                f"turn {k} is {turn!r:.80}; every turn must be an object {{'from': 'human'|'gpt', 'value': text}}",
            )
    if str(turns[0].get("from", "")).lower() not in HUMAN_ROLES:  # LLaVA drops a leading non-human turn
        turns = turns[1:]
    if len(turns) < 2 or len(turns) % 2:
        raise BadSample("unpaired_turns", f"{len(turns)} turns; human and gpt turns must come in pairs")
    rounds = []
    for k in range(0, len(turns), 2):
        human, gpt = turns[k], turns[k + 1]
        roles = (str(human.get("from", "")).lower(), str(gpt.get("from", "")).lower())
        if roles[0] not in HUMAN_ROLES or roles[1] not in ASSISTANT_ROLES:
            raise BadSample("turn_order", f"turns {k} and {k + 1} are {roles}, expected (human, gpt)")
        question, answer = human.get("value"), gpt.get("value")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise BadSample("non_text_turn", f"turn values must be strings (turn {k})")
        if not answer.strip():
            raise BadSample("empty_answer", f"the answer of round {k // 2} is empty")
        rounds.append([question, answer])

    num_image_tokens = sum(question.count(image_token) for question, _ in rounds)
    if has_image and num_image_tokens != 1:
        reason = "image_without_placeholder" if num_image_tokens == 0 else "too_many_placeholders"
        raise BadSample(reason, f"one image but {num_image_tokens} {image_token!r} in the human turns")
    if not has_image and num_image_tokens:
        raise BadSample("placeholder_without_image", f"{image_token!r} in the text but no `image` given")
    if has_image:
        holder = next(k for k, (question, _) in enumerate(rounds) if image_token in question)
        question = rounds[holder][0].replace(image_token, "").strip()
        rounds[holder][0] = f"{image_token}\n{question}"
        if holder != 0:  # the image belongs to the conversation: LLaVA puts it in the first question
            rounds[0], rounds[holder] = rounds[holder], rounds[0]
    return [tuple(r) for r in rounds]


# ===================================================================================== dataset
class LazyLLaVADataset(Dataset):
    """LLaVA JSON samples, images opened only when a sample is drawn.

    Args:
        data_path: the JSON list (or JSON lines) file.
        image_folder: folder that the samples' relative `image` paths start from.
        processor: a QMoPProcessor (image processor, LLM tokenizer with a fast backend, CLIP query tokenizer).
        template: "plain" (stage 1) or "vicuna_v1" (stage 2).
        model_max_length: longest token sequence; longer samples are cut at the end (counted), or skipped when
            the cut would fall inside the image or leave no answer.
        num_visual_tokens: placeholders per image (defaults to the processor's budget).
        require_image: skip text-only samples (stage 1 has nothing to learn from them).
        cache_samples: keep every encoded sample in memory after its first draw (the encoding is deterministic): for
            small data trained for several epochs, where opening, preprocessing and tokenising cost as much as the
            step itself (the mini VTCBench). A picture's pixels are kept once, however many samples share it.
    """

    def __init__(
        self,
        data_path: str,
        processor,
        image_folder: Optional[str] = None,
        template: TemplateName = "vicuna_v1",
        model_max_length: int = 2048,
        num_visual_tokens: Optional[int] = None,
        require_image: bool = False,
        pad_to_square: Optional[bool] = None,
        cache_samples: bool = False,
    ):
        self.samples = load_llava_json(data_path)
        self.processor = processor
        self.image_folder = image_folder
        self.template = get_template(template)
        self.model_max_length = model_max_length
        self.num_visual_tokens = num_visual_tokens or processor.num_visual_tokens
        self.require_image = require_image
        self.pad_to_square = pad_to_square
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        tokenizer = processor.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "Training needs a fast tokenizer (offset mappings locate the answers); load the processor with "
                "its default fast tokenizer."
            )
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has no EOS token; the vicuna_v1 template ends every answer with it.")
        if model_max_length <= self.num_visual_tokens:
            raise ValueError(
                f"`model_max_length`={model_max_length} leaves no room for text after {self.num_visual_tokens} "
                "visual tokens."
            )
        self.skipped = Counter()  # reason -> number of distinct samples skipped (in this process)
        self._bad_positions = set()  # skipped once, warned once: later draws pass over them silently
        self.truncated = 0
        self._encoded = {} if cache_samples else None  # position -> item
        self._pixels = {}  # image path -> pixel_values (1, 3, H, W), shared by the cached items of one picture

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        # A bad sample is replaced by the next good one, so that batches (and DDP ranks) stay in step.
        for attempt in range(len(self.samples)):
            position = (index + attempt) % len(self.samples)
            if position in self._bad_positions:
                continue
            try:
                return self._encode_at(position)
            except BadSample as bad:
                self._bad_positions.add(position)
                self.skipped[bad.reason] += 1
                logger.warning(
                    "Skipping sample %r (index %d): %s [%d skipped so far: %s]",
                    self.samples[position].get("id", position), position, bad, sum(self.skipped.values()),
                    dict(self.skipped),
                )
        raise RuntimeError(f"Every one of the {len(self.samples)} samples is unusable: {dict(self.skipped)}.")

    def _encode_at(self, position: int) -> dict:
        if self._encoded is None:
            return self.encode(self.samples[position])
        if position not in self._encoded:
            item = self.encode(self.samples[position])
            if "pixel_values" in item:
                image = self.samples[position]["image"]
                item["pixel_values"] = self._pixels.setdefault(image, item["pixel_values"])
            self._encoded[position] = item
        return dict(self._encoded[position])

    # ---------------------------------------------------------------------------------------- one sample
    def load_image(self, sample: dict):
        from PIL import Image, UnidentifiedImageError

        relative = sample["image"]
        if not isinstance(relative, str) or not relative:
            raise BadSample("bad_image_field", f"`image` must be one relative path, got {relative!r}")
        path = os.path.join(self.image_folder, relative) if self.image_folder else relative
        if not os.path.isfile(path):
            raise BadSample("missing_image", f"no file {path}")
        try:
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise BadSample("corrupt_image", f"{path} cannot be decoded ({error})") from error

    def encode(self, sample: dict) -> dict:
        """input_ids / labels (T,), and for an image sample pixel_values (1, 3, H, W), query ids/mask (1, Lq)."""
        has_image = sample.get("image") is not None
        if self.require_image and not has_image:
            raise BadSample("text_only", "text-only samples are skipped in this stage")
        rounds = parse_conversations(sample, self.image_token, has_image)
        rendered = self.template.render(rounds, self.image_token, self.processor.tokenizer.eos_token, has_image)
        image = self.load_image(sample) if has_image else None

        extra = {} if self.pad_to_square is None else {"pad_to_square": self.pad_to_square}
        encoding = self.processor(
            images=[image] if has_image else None,
            text=[rendered.text],
            queries=[rendered.query] if has_image else None,
            num_visual_tokens=self.num_visual_tokens,
            padding=False,
            return_offsets_mapping=True,
            **extra,
        )
        input_ids = encoding["input_ids"][0]  # (T,)
        offsets = encoding["offset_mapping"][0]  # (T, 2) in the text with `<image>` expanded to M copies
        spans = [self._expanded_span(rendered.text, span) for span in rendered.answer_spans]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        starts, ends = offsets[:, 0], offsets[:, 1]
        is_target = torch.zeros_like(input_ids, dtype=torch.bool)
        for span_start, span_end in spans:
            is_target |= (ends > starts) & (starts < span_end) & (ends > span_start)
        is_target &= input_ids != self.image_token_id
        labels[is_target] = input_ids[is_target]

        full_length = input_ids.shape[0]
        input_ids, labels = self._fit_length(input_ids, labels)
        if not bool((labels != IGNORE_INDEX).any()):
            raise BadSample("no_target_tokens", f"no answer token within model_max_length={self.model_max_length}")
        if input_ids.shape[0] < full_length:
            self.truncated += 1
            logger.warning(
                "Sample %r of %d tokens was cut to model_max_length=%d (%d cut so far).",
                sample.get("id"), full_length, self.model_max_length, self.truncated,
            )
        item = {"input_ids": input_ids, "labels": labels}
        if has_image:
            item["pixel_values"] = encoding["pixel_values"]  # (1, 3, H, W)
            item["query_input_ids"] = encoding["query_input_ids"]  # (1, Lq)
            item["query_attention_mask"] = encoding["query_attention_mask"]  # (1, Lq)
        return item

    def _expanded_span(self, text: str, span: tuple) -> tuple:
        """A character span of `text` moved to the text in which each `<image>` became M copies."""
        growth = (self.num_visual_tokens - 1) * len(self.image_token)
        start, end = span
        return start + growth * text.count(self.image_token, 0, start), end + growth * text.count(self.image_token, 0, end)

    def _fit_length(self, input_ids: torch.Tensor, labels: torch.Tensor):
        if input_ids.shape[0] <= self.model_max_length:
            return input_ids, labels
        image_positions = (input_ids == self.image_token_id).nonzero().flatten()
        if image_positions.numel() and int(image_positions[-1]) >= self.model_max_length:
            raise BadSample(
                "overflow_inside_image",
                f"{input_ids.shape[0]} tokens > model_max_length {self.model_max_length} and the cut would fall "
                "inside the image placeholders",
            )
        return input_ids[: self.model_max_length], labels[: self.model_max_length]

    def report(self) -> dict:
        """What this process skipped and cut so far."""
        return {"skipped": dict(self.skipped), "num_skipped": sum(self.skipped.values()), "truncated": self.truncated}


def load_llava_json(data_path: str) -> list:
    """A LLaVA data file: a JSON list, or JSON lines (one sample per line)."""
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"`data_path` {data_path!r} does not exist.")
    with open(data_path, encoding="utf-8") as f:
        text = f.read()
    try:
        samples = json.loads(text)
    except json.JSONDecodeError:
        try:
            samples = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{data_path} is neither a JSON list nor JSON lines: {error}") from error
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        raise ValueError(f"{data_path} must hold a list of samples (objects with `conversations`).")
    if not samples:
        raise ValueError(f"{data_path} holds no samples.")
    return samples


def _turns_problem(sample: dict) -> Optional[str]:
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "`conversations` is missing or not a list"
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or "value" not in turn:
            return f"turn {k} is {turn!r:.80}, not an object {{'from': 'human'|'gpt', 'value': text}}"
    return None


def check_llava_data(data_path: str) -> int:
    """Read the data file once before training starts: an error naming `data_path` when it is not LLaVA
    conversation data at all (no sample with a list of {from, value} turns); returns the number of samples.
    Individual bad samples are skipped and counted during training, as before."""
    samples = load_llava_json(data_path)
    problems = [_turns_problem(sample) for sample in samples]
    if all(problems):
        raise ValueError(
            f"`data_path` {data_path!r}: none of its {len(samples)} samples holds LLaVA conversations "
            f"(sample 0: {problems[0]}). Expected [{{'image': ..., 'conversations': [{{'from': 'human', 'value': ...}}, "
            "{'from': 'gpt', 'value': ...}]}, ...]."
        )
    return len(samples)


# ===================================================================================== collator
@dataclass
class QMoPDataCollator:
    """Pads a list of dataset items on the right (training needs no left padding): ids with the LLM's pad id,
    labels with -100, attention_mask 0; images and their query rows are stacked in sample order.

    With `budgets` (e.g. (16, 36, 64, 144)), every batch is trained at one budget M drawn from them (a stream seeded
    with `seed`): the dataset encodes each image with max(budgets) placeholders and the collator keeps the first M of
    each image's run (the model reads M from the placeholders), so one checkpoint serves every budget."""

    pad_token_id: int
    query_pad_token_id: int
    image_token_id: Optional[int] = None
    budgets: Optional[tuple] = None
    seed: int = 0

    def __post_init__(self):
        if self.budgets is not None:
            if not self.budgets or self.image_token_id is None:
                raise ValueError("`budgets` needs at least one budget and the `image_token_id` of the placeholders.")
            self.budgets = tuple(sorted(set(int(b) for b in self.budgets)))
            self._rng = random.Random(self.seed)

    @classmethod
    def from_processor(cls, processor, budgets=None, seed: int = 0) -> "QMoPDataCollator":
        tokenizer, query_tokenizer = processor.tokenizer, processor.query_tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        if pad is None:
            raise ValueError("The LLM tokenizer has neither a pad nor an unk token to pad batches with.")
        query_pad = query_tokenizer.pad_token_id
        if query_pad is None:
            query_pad = query_tokenizer.eos_token_id
        return cls(pad_token_id=pad, query_pad_token_id=query_pad, image_token_id=processor.image_token_id,
                   budgets=budgets, seed=seed)

    def _shrink_images(self, items: list) -> list:
        """Keep the first M placeholders of every image's run of max(budgets), M drawn for this batch."""
        budget, encoded = self._rng.choice(self.budgets), self.budgets[-1]
        shrunk = []
        for item in items:
            positions = (item["input_ids"] == self.image_token_id).nonzero().flatten()  # runs of `encoded` each
            if positions.numel() % encoded:
                raise ValueError(
                    f"An item has {positions.numel()} image placeholders, not a multiple of {encoded}: encode the "
                    f"dataset with num_visual_tokens=max(budgets)."
                )
            keep = torch.ones_like(item["input_ids"], dtype=torch.bool)  # (T,)
            keep[positions[torch.arange(positions.numel()) % encoded >= budget]] = False
            shrunk.append(dict(item, input_ids=item["input_ids"][keep], labels=item["labels"][keep]))
        return shrunk

    def __call__(self, items: list) -> dict:
        if self.budgets is not None:
            items = self._shrink_images(items)
        length = max(item["input_ids"].shape[0] for item in items)
        batch_size = len(items)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)  # (B, T)
        for row, item in enumerate(items):
            n = item["input_ids"].shape[0]
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

        with_images = [item for item in items if "pixel_values" in item]
        if with_images:
            batch["pixel_values"] = torch.cat([item["pixel_values"] for item in with_images])  # (N, 3, H, W)
            query_length = max(item["query_input_ids"].shape[1] for item in with_images)
            query_ids = torch.full((len(with_images), query_length), self.query_pad_token_id, dtype=torch.long)
            query_mask = torch.zeros((len(with_images), query_length), dtype=torch.long)  # (N, Lq)
            for row, item in enumerate(with_images):
                n = item["query_input_ids"].shape[1]
                query_ids[row, :n] = item["query_input_ids"][0]
                query_mask[row, :n] = item["query_attention_mask"][0]
            batch["query_input_ids"] = query_ids
            batch["query_attention_mask"] = query_mask
        return batch
