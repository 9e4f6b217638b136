"""Router diagnostic: does the Query Guided Router read the question, or only the picture?

    qmop router --model DIR --data JSON --image-folder DIR \
        [--pictures 100] [--questions N] [--type-field dimension] [--output out.json] [--markdown out.md] [--quiet]

For a grid of P pictures × Q questions the router is evaluated on every (picture, question) cell without running the
language model: the vision CLS token once per picture (`get_vision_features`), the question's EOS embedding once per
question (`get_query_embeds`), then the router module in eval mode on all P·Q combinations. Its logits, probabilities
and top-k weights are exactly what a forward pass of the model computes for that picture and question.

What is measured (the analysis of shared/research/fidelity_diagnosis.md section 3, made reusable):
- **Variance decomposition** of the router logits. Softmax is invariant to adding the same constant to every branch,
  so the logits of each cell are first centred over branches; only differences between branches are left, and
  those are all the routing decision depends on. Then, per branch, the balanced two-way decomposition over the grid:
  logit[i, j] = mean + picture effect a_i + question effect c_j + interaction r_ij, with
  var_picture = mean_i a_i², var_question = mean_j c_j², var_interaction = mean_ij r_ij² (these add up to the
  total variance). `question_share` = Σ_b var_question / Σ_b (var_picture + var_question + var_interaction);
  `picture_share` likewise.
- **Routed branch per question type**: the share of cells whose top-1 branch (argmax of the weights) is each branch,
  and the mean weights, per question type.
- **Saturated share**: cells whose eval-mode top probability exceeds 0.99.
- **Mutual information** (bits) between question type and top-1 branch over the cells, normalised by
  min(H(type), H(branch)): 1.0 when one determines the other (when the branch is a function of the type, MI =
  H(branch) ≤ H(type)), 0.0 when they are independent. Plus the dominant branch per type.
- **Flip rates**: the probability that changing only the question (two distinct questions, same picture) changes the
  selected top-k set of branches, averaged over pictures; and the same for changing only the picture. The set is read
  from the logits (the k largest), which orders branches as the probabilities do but never ties: a saturated softmax
  underflows the runner-up's probability (and weight) to exactly 0.
"""

import argparse
import json
import logging
import math
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from qmop_tools.bench.report import write_atomic
from qmop_tools.checks import looks_like_hub_id

logger = logging.getLogger(__name__)
SATURATION_THRESHOLD = 0.99
RESAVE_HINT = (
    "Re-save the checkpoint with the current code (load it, then `model.save_pretrained(folder)`), which copies the "
    "current modeling_qmop.py into the folder."
)


class DataError(ValueError):
    """The data file, its samples or its images cannot be used (raised before any model is loaded)."""


# ===================================================================================== pure metrics
def entropy_bits(labels: Sequence) -> float:
    """Entropy (bits) of the empirical distribution of `labels`."""
    _, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def mutual_information(types: Sequence, branches: Sequence) -> float:
    """Mutual information (bits) between two label sequences of equal length, from their empirical joint
    distribution: Σ p(t, b) log2(p(t, b) / (p(t) p(b))) = H(type) + H(branch) - H(type, branch)."""
    if len(types) != len(branches):
        raise ValueError(f"{len(types)} types but {len(branches)} branches: give one of each per cell.")
    if len(types) == 0:
        raise ValueError("mutual_information needs at least one (type, branch) pair.")
    joint = [f"{t}\x00{b}" for t, b in zip(map(str, types), map(str, branches))]
    return max(0.0, entropy_bits(types) + entropy_bits(branches) - entropy_bits(joint))


def variance_decomposition(logits: np.ndarray) -> dict:
    """Two-way decomposition of router logits (P, Q, nb) over the (picture, question) grid, per branch, after centring
    each cell over branches. Returns {"picture", "question", "interaction"}: arrays (nb,) that add up to the total
    variance of the centred logits over the grid."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"logits must have shape (pictures, questions, branches), got {x.shape}.")
    x = x - x.mean(axis=-1, keepdims=True)  # (P, Q, nb): softmax ignores a shift shared by all branches
    grand = x.mean(axis=(0, 1), keepdims=True)  # (1, 1, nb)
    picture = x.mean(axis=1, keepdims=True) - grand  # (P, 1, nb)
    question = x.mean(axis=0, keepdims=True) - grand  # (1, Q, nb)
    interaction = x - grand - picture - question  # (P, Q, nb)
    return {
        "picture": (picture**2).mean(axis=(0, 1)),
        "question": (question**2).mean(axis=(0, 1)),
        "interaction": (interaction**2).mean(axis=(0, 1)),
    }


def flip_rate(selected: np.ndarray, axis: int) -> Optional[float]:
    """Probability that two cells differing only along `axis` (1: the question, 0: the picture) select different
    branch sets; `selected` (P, Q) holds one hashable code per cell. Averaged over the other axis, over all ordered
    pairs of distinct positions along `axis`. `None` with fewer than two positions."""
    rows = np.asarray(selected)
    if axis == 0:
        rows = rows.T
    n = rows.shape[1]
    if n < 2:
        return None
    rates = []
    for row in rows:  # one picture (axis=1) or one question (axis=0)
        _, counts = np.unique(row, return_counts=True)
        same = float((counts * (counts - 1)).sum())
        rates.append(1.0 - same / (n * (n - 1)))
    return float(np.mean(rates))


# ===================================================================================== result
@dataclass
class RouterGrid:
    """The router on every (picture, question) cell: logits, eval-mode probs and top-k weights, each (P, Q, nb)."""

    logits: np.ndarray
    probs: np.ndarray
    weights: np.ndarray


@dataclass
class RouterDiagnosis:
    """Router diagnostic over a P × Q grid (see the module docstring for every definition)."""

    branches: list
    num_pictures: int
    num_questions: int
    eval_temperature: Optional[float]
    top_k: Optional[int]
    router_mode: Optional[str]
    questions_per_type: dict  # type -> number of questions
    # variance of the branch-centred logits, per branch: {"picture": {branch: var}, "question": ..., "interaction": ...}
    variance: dict
    question_share: Optional[float]  # None when the centred logits do not vary at all
    picture_share: Optional[float]
    interaction_share: Optional[float]
    question_share_per_branch: dict
    picture_share_per_branch: dict
    routed_share_per_type: dict  # type -> {branch: share of cells whose top-1 branch it is}
    mean_weights_per_type: dict  # type -> {branch: mean weight}
    saturated_share: float
    saturated_share_per_type: dict
    mutual_information_bits: float
    type_entropy_bits: float
    branch_entropy_bits: float
    normalized_mutual_information: Optional[float]  # MI / min(H(type), H(branch)); None when that minimum is 0
    dominant_branch_per_type: dict
    dominant_branch_differs: bool
    question_flip_rate: Optional[float]
    picture_flip_rate: Optional[float]
    saturation_threshold: float = SATURATION_THRESHOLD
    metadata: dict = field(default_factory=dict)  # model, data, seed, which code computed the router
    grid: Optional[RouterGrid] = field(default=None, repr=False, compare=False)  # not in to_dict()

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "grid"}
        return _json_ready(data)

    def to_markdown(self, title: str = "Router diagnostic") -> str:
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        branches = self.branches
        lines = [
            f"### {title}",
            "",
            f"{self.num_pictures} pictures × {self.num_questions} questions ({self.num_pictures * self.num_questions} "
            f"cells); router `{self.router_mode}`, top-{self.top_k}, eval temperature {self.eval_temperature}.",
            "",
            f"- The question explains **{pct(self.question_share)}** of the router-logit variance, the picture "
            f"{pct(self.picture_share)}, their interaction {pct(self.interaction_share)} (logits centred over branches).",
            f"- Changing only the question changes the selected branches in {pct(self.question_flip_rate)} of cells; "
            f"changing only the picture in {pct(self.picture_flip_rate)}.",
            f"- Saturated (top probability > {self.saturation_threshold}): {pct(self.saturated_share)} of cells.",
            f"- Mutual information between question type and top-1 branch: {self.mutual_information_bits:.3f} bits "
            f"(H(type) {self.type_entropy_bits:.3f}, H(branch) {self.branch_entropy_bits:.3f}; normalised "
            + ("n/a" if self.normalized_mutual_information is None else f"{self.normalized_mutual_information:.3f}")
            + ").",
            f"- Dominant (most often top-1) branch differs between question types: "
            f"**{'yes' if self.dominant_branch_differs else 'no'}** (see its share per type below; a near tie can flip it).",
            "",
            "| variance of the centred logit | " + " | ".join(branches) + " |",
            "|---|" + "---|" * len(branches),
        ]
        for part in ("picture", "question", "interaction"):
            lines.append(f"| {part} | " + " | ".join(f"{self.variance[part][b]:.4g}" for b in branches) + " |")
        lines.append("| question share | " + " | ".join(pct(self.question_share_per_branch[b]) for b in branches) + " |")
        lines += [
            "",
            "| question type | questions | top-1 share (" + " / ".join(branches) + ") | mean weights ("
            + " / ".join(branches) + ") | dominant | saturated |",
            "|---|---|---|---|---|---|",
        ]
        for kind in self.routed_share_per_type:
            share = " / ".join(f"{self.routed_share_per_type[kind][b]:.2f}" for b in branches)
            weights = " / ".join(f"{self.mean_weights_per_type[kind][b]:.2f}" for b in branches)
            dominant = self.dominant_branch_per_type[kind]
            dominant = f"{dominant} ({self.routed_share_per_type[kind][dominant]:.2f})"
            lines.append(
                f"| {kind} | {self.questions_per_type[kind]} | {share} | {weights} | {dominant} "
                f"| {pct(self.saturated_share_per_type[kind])} |"
            )
        return "\n".join(lines) + "\n"


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(f"{float(value):.6g}")  # 6 significant digits
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _share(part: float, total: float) -> Optional[float]:
    return float(part / total) if total > 0 else None


def _top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :k]  # (P, Q, k)
    mask = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def summarize_router_grid(
    grid: RouterGrid,
    question_types: Sequence[str],
    branches: Sequence[str],
    saturation_threshold: float = SATURATION_THRESHOLD,
    **record,
) -> RouterDiagnosis:
    """All metrics from a computed grid (P, Q, nb) and one type per question; `record` holds the fields that describe
    the router (eval_temperature, top_k, router_mode, metadata)."""
    logits, probs, weights = (np.asarray(a, dtype=np.float64) for a in (grid.logits, grid.probs, grid.weights))
    num_pictures, num_questions, num_branches = logits.shape
    branches = list(branches)
    question_types = [str(t) for t in question_types]
    if len(branches) != num_branches:
        raise ValueError(f"{len(branches)} branch names for {num_branches} router columns.")
    if len(question_types) != num_questions:
        raise ValueError(f"{len(question_types)} question types for {num_questions} questions: give one per question.")

    parts = variance_decomposition(logits)
    total = sum(float(parts[p].sum()) for p in parts)
    per_branch_total = parts["picture"] + parts["question"] + parts["interaction"]
    variance = {p: dict(zip(branches, parts[p].tolist())) for p in parts}

    top1 = weights.argmax(axis=-1)  # (P, Q)
    saturated = probs.max(axis=-1) > saturation_threshold  # (P, Q)
    cell_types = np.broadcast_to(np.asarray(question_types, dtype=object), (num_pictures, num_questions))
    types = list(dict.fromkeys(sorted(question_types)))
    routed, mean_weights, saturated_per_type, dominant = {}, {}, {}, {}
    for kind in types:
        columns = np.array([t == kind for t in question_types])
        kind_top1 = top1[:, columns]
        routed[kind] = {b: float((kind_top1 == k).mean()) for k, b in enumerate(branches)}
        mean_weights[kind] = dict(zip(branches, weights[:, columns].mean(axis=(0, 1)).tolist()))
        saturated_per_type[kind] = float(saturated[:, columns].mean())
        dominant[kind] = max(branches, key=lambda b: routed[kind][b])  # ties: first in branch order

    branch_labels = [branches[k] for k in top1.ravel()]
    mi = mutual_information(cell_types.ravel().tolist(), branch_labels)
    h_type, h_branch = entropy_bits(cell_types.ravel().tolist()), entropy_bits(branch_labels)
    # One code per cell for its top-k set: the k largest logits, which is the router's top-k of the probabilities
    # (a monotone function of the logits) without the ties that saturated probabilities underflow to.
    top_k = record.get("top_k")
    chosen = weights > 0 if top_k is None else _top_k_mask(logits, int(top_k))  # (P, Q, nb)
    selected = (chosen * (2 ** np.arange(num_branches))).sum(axis=-1)  # (P, Q)

    return RouterDiagnosis(
        branches=branches,
        num_pictures=num_pictures,
        num_questions=num_questions,
        eval_temperature=record.pop("eval_temperature", None),
        top_k=record.pop("top_k", None),
        router_mode=record.pop("router_mode", None),
        questions_per_type={kind: question_types.count(kind) for kind in types},
        variance=variance,
        question_share=_share(float(parts["question"].sum()), total),
        picture_share=_share(float(parts["picture"].sum()), total),
        interaction_share=_share(float(parts["interaction"].sum()), total),
        question_share_per_branch={b: _share(parts["question"][k], per_branch_total[k]) for k, b in enumerate(branches)},
        picture_share_per_branch={b: _share(parts["picture"][k], per_branch_total[k]) for k, b in enumerate(branches)},
        routed_share_per_type=routed,
        mean_weights_per_type=mean_weights,
        saturated_share=float(saturated.mean()),
        saturated_share_per_type=saturated_per_type,
        mutual_information_bits=mi,
        type_entropy_bits=h_type,
        branch_entropy_bits=h_branch,
        normalized_mutual_information=mi / min(h_type, h_branch) if min(h_type, h_branch) > 0 else None,
        dominant_branch_per_type=dominant,
        dominant_branch_differs=len(set(dominant.values())) > 1,
        question_flip_rate=flip_rate(selected, axis=1),
        picture_flip_rate=flip_rate(selected, axis=0),
        saturation_threshold=saturation_threshold,
        metadata=record.pop("metadata", {}),
        grid=grid,
    )


# ===================================================================================== the grid
def _base_model(model):
    """The QMoPModel inside a QMoPForConditionalGeneration (or the QMoPModel itself)."""
    base = model if hasattr(model, "get_vision_features") else getattr(model, "model", None)
    if base is None or not hasattr(base, "get_vision_features") or not hasattr(base, "projector"):
        raise TypeError(f"Expected a QMoP-LLaVA model (QMoPForConditionalGeneration or QMoPModel), got {type(model)}.")
    return base


def get_router(model):
    """The model's QueryGuidedRouter; ValueError for models without one (single branch, router_mode="uniform")."""
    base = _base_model(model)
    router = base.projector.router
    if router is None:
        config = base.config
        raise ValueError(
            f"This model has no router to diagnose (branches={list(config.branches)}, "
            f"router_mode={config.router_mode!r}): a single branch or equal-weight fusion routes the same way for every "
            "picture and question. Use a model with router_mode 'query' or 'vision'."
        )
    if not hasattr(router, "logits"):
        raise ValueError(
            "This model's code predates `QueryGuidedRouter.logits` (the router does not return its logits), so the "
            f"diagnostic cannot read them. {RESAVE_HINT}"
        )
    return router


def _normalize_question(question: str, image_token: str) -> str:
    """The question as the processor extracts it from a prompt: image tokens removed, whitespace collapsed."""
    return " ".join(str(question).replace(image_token, " ").split())


@torch.no_grad()
def compute_router_grid(model, processor, images, questions, batch_size: int = 64, disable_tqdm: bool = False) -> RouterGrid:
    """Router logits, eval-mode probs and top-k weights for every (picture, question) pair, without the LLM.

    The model is put in eval mode (and the trainer's `uniform` switch off, so the router's own choice is measured);
    every module's previous mode is restored afterwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    images, questions = list(images), list(questions)
    if not images or not questions:
        raise ValueError(f"Need at least one picture and one question, got {len(images)} and {len(questions)}.")
    router = get_router(model)
    base = _base_model(model)
    modes = {module: module.training for module in model.modules()}
    uniform = getattr(router, "uniform", False)
    model.eval()
    router.uniform = False
    try:
        # Vision CLS token once per picture: (P, Cv).
        cls_tokens = []
        for begin in tqdm(range(0, len(images), batch_size), desc="pictures", disable=disable_tqdm):
            pixel_values = processor(images=images[begin : begin + batch_size], return_tensors="pt")["pixel_values"]
            hidden = base.get_vision_features(pixel_values)[0]  # (n, S, Cv)
            cls_tokens.append(hidden[:, 0])
        device = next(router.parameters()).device
        cls_tokens = torch.cat(cls_tokens).to(device)  # (P, Cv)

        # Question EOS embedding once per question: (Q, Ct); a question-blind router reads none.
        query_embeds = None
        if router.uses_query:
            image_token = getattr(processor, "image_token", "<image>")
            texts = [_normalize_question(q, image_token) for q in questions]
            query_embeds = []
            for begin in tqdm(range(0, len(texts), batch_size), desc="questions", disable=disable_tqdm):
                encoded = processor.query_tokenizer(
                    texts[begin : begin + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=processor.query_max_length,
                    return_tensors="pt",
                    return_token_type_ids=False,
                )  # the same call as QMoPProcessor makes for the query of a prompt
                query_embeds.append(base.get_query_embeds(encoded["input_ids"], encoded["attention_mask"]))
            query_embeds = torch.cat(query_embeds).to(device)  # (Q, Ct)

        # The router on every cell, flattened in (picture, question) order: cell c = (c // Q, c % Q).
        num_pictures, num_questions = len(images), len(questions)
        num_cells = num_pictures * num_questions
        cell_batch = max(batch_size, 4096)  # the router is a small MLP: many cells per call
        outputs = {"logits": [], "probs": [], "weights": []}
        for begin in tqdm(range(0, num_cells, cell_batch), desc="router cells", disable=disable_tqdm):
            cells = torch.arange(begin, min(begin + cell_batch, num_cells), device=device)
            queries = None if query_embeds is None else query_embeds[cells % num_questions]  # (n, Ct)
            routed = router(cls_tokens[cells // num_questions], queries)  # RouterOutput, each (n, nb)
            for name in outputs:
                outputs[name].append(getattr(routed, name).float().cpu())
    finally:
        router.uniform = uniform
        for module, training in modes.items():
            module.training = training
    shape = (num_pictures, num_questions, -1)
    return RouterGrid(**{name: torch.cat(parts).reshape(shape).numpy() for name, parts in outputs.items()})


def diagnose_router(
    model,
    processor,
    images,
    questions,
    question_types: Optional[Sequence[str]] = None,
    batch_size: int = 64,
    disable_tqdm: bool = False,
    saturation_threshold: float = SATURATION_THRESHOLD,
    metadata: Optional[dict] = None,
) -> RouterDiagnosis:
    """Diagnose the router of a QMoP-LLaVA model (router_mode "query" or "vision") on a grid of `images` (anything
    the processor takes) × `questions` (strings; one type each in `question_types`, default all "all")."""
    questions = list(questions)
    question_types = ["all"] * len(questions) if question_types is None else [str(t) for t in question_types]
    if len(question_types) != len(questions):
        raise ValueError(f"{len(question_types)} question types for {len(questions)} questions: give one per question.")
    router = get_router(model)
    grid = compute_router_grid(model, processor, images, questions, batch_size=batch_size, disable_tqdm=disable_tqdm)
    config = _base_model(model).config
    return summarize_router_grid(
        grid,
        question_types,
        list(config.branches),
        saturation_threshold=saturation_threshold,
        eval_temperature=float(router.eval_temperature),
        top_k=int(router.top_k),
        router_mode=config.router_mode,
        metadata=dict(metadata or {}),
    )


# ===================================================================================== from data
def load_samples(data_path: str, image_folder: str, type_field: str = "dimension") -> list:
    """(image path, question, type) for every LLaVA-format sample with an image and a first human turn; the question
    is that turn with `<image>` removed and stripped; samples without `type_field` get type "all"."""
    try:
        with open(data_path) as f:
            samples = json.load(f)
    except json.JSONDecodeError as error:
        raise DataError(f"{data_path} is not valid JSON: {error}") from None
    if not isinstance(samples, list):
        raise DataError(f"{data_path} must hold a list of LLaVA samples (objects with `image` and `conversations`).")
    rows = []
    for sample in samples:
        if not isinstance(sample, dict) or not sample.get("image") or not sample.get("conversations"):
            continue
        turns = sample["conversations"]
        human = next((t for t in turns if isinstance(t, dict) and t.get("from") in ("human", "user")), turns[0])
        if not isinstance(human, dict):
            continue
        if not isinstance(human.get("value"), str):
            continue
        question = human["value"].replace("<image>", "").strip()
        rows.append((os.path.join(image_folder, sample["image"]), question, str(sample.get(type_field, "all"))))
    if not rows:
        raise DataError(f"{data_path} has no sample with an `image` and a human turn in `conversations`.")
    return rows


def select_grid(rows: list, num_pictures: int = 100, num_questions: Optional[int] = None, seed: int = 0):
    """Up to `num_pictures` distinct pictures (random, kept in file order) and distinct questions, stratified by type
    (round-robin over types after shuffling each), so every type is represented. Returns (pictures, questions, types);
    a question's type is that of its first sample."""
    rng = random.Random(seed)
    pictures = list(dict.fromkeys(path for path, _, _ in rows))
    if len(pictures) > num_pictures:
        chosen = set(rng.sample(pictures, num_pictures))
        pictures = [p for p in pictures if p in chosen]
    question_type = {}
    for _, question, kind in rows:
        question_type.setdefault(question, kind)
    by_type = {}
    for question, kind in question_type.items():
        by_type.setdefault(kind, []).append(question)
    if num_questions is not None and num_questions < len(by_type):
        raise DataError(
            f"--questions {num_questions} is fewer than the {len(by_type)} question types ({', '.join(sorted(by_type))}); "
            "every type must be represented."
        )
    pools = []
    for kind in sorted(by_type):
        pool = list(by_type[kind])
        rng.shuffle(pool)
        pools.append(pool)
    limit = len(question_type) if num_questions is None else min(num_questions, len(question_type))
    questions = []
    while len(questions) < limit:
        for pool in pools:
            if pool and len(questions) < limit:
                questions.append(pool.pop(0))
    return pictures, questions, [question_type[q] for q in questions]


def load_model_and_processor(model_dir: str):
    """Auto classes with the checkpoint's own code. A checkpoint whose code predates `QueryGuidedRouter.logits` is
    loaded into this repository's `modeling_qmop.QMoPForConditionalGeneration` instead, when every weight matches
    (that older code computes the same eval-mode router); otherwise the error says to re-save it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True)
    code = "checkpoint"
    router = _base_model(model).projector.router
    if router is not None and not hasattr(router, "logits"):
        del model
        model, code = _load_with_repository_code(model_dir), "repository"
    return model.eval(), processor, code


def _load_with_repository_code(model_dir: str):
    try:
        from modeling_qmop import QMoPForConditionalGeneration
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        sys.path.insert(0, root)
        try:
            from modeling_qmop import QMoPForConditionalGeneration
        except ImportError:
            raise ValueError(f"{model_dir} carries a modeling_qmop.py without router logits. {RESAVE_HINT}") from None
    model, info = QMoPForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    mismatch = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if mismatch:
        raise ValueError(
            f"{model_dir} carries a modeling_qmop.py without router logits, and its weights do not load exactly into "
            f"the current code ({mismatch}). {RESAVE_HINT}"
        )
    logger.warning(
        f"{model_dir} carries an older modeling_qmop.py (no router logits); its weights were loaded into this "
        "repository's modeling_qmop.py, which computes the same eval-mode router."
    )
    return model


def diagnose_from_data(
    model_dir_or_model,
    data_path: str,
    image_folder: str,
    num_pictures: int = 100,
    num_questions: Optional[int] = None,
    type_field: str = "dimension",
    seed: int = 0,
    processor=None,
    batch_size: int = 64,
    disable_tqdm: bool = False,
) -> RouterDiagnosis:
    """Diagnose a checkpoint folder (or a loaded model with its `processor`) on LLaVA-format data: up to
    `num_pictures` pictures × the distinct questions (up to `num_questions`, stratified by `type_field`). The data and
    pictures are read and checked before the model is loaded."""
    from PIL import Image

    if num_pictures < 1 or (num_questions is not None and num_questions < 1):
        raise ValueError(f"num_pictures and num_questions must be >= 1, got {num_pictures} and {num_questions}.")
    rows = load_samples(data_path, image_folder, type_field)
    pictures, questions, types = select_grid(rows, num_pictures, num_questions, seed)
    missing = [p for p in pictures if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} picture(s) not found, e.g. {missing[0]} (is --image-folder right?).")
    images = []
    for path in pictures:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as error:
            raise DataError(f"cannot read picture {path}: {error}") from None

    if isinstance(model_dir_or_model, (str, os.PathLike)):
        model, processor, code = load_model_and_processor(os.fspath(model_dir_or_model))
        model_name = os.fspath(model_dir_or_model)
    else:
        if processor is None:
            raise ValueError("Pass the `processor` with a loaded model.")
        model, code, model_name = model_dir_or_model, "given", type(model_dir_or_model).__name__
    metadata = {
        "model": model_name,
        "model_code": code,
        "data": os.fspath(data_path),
        "type_field": type_field,
        "seed": seed,
        "pictures": [os.path.relpath(path, image_folder) for path in pictures],
        "questions": questions,
    }
    return diagnose_router(
        model, processor, images, questions, types, batch_size=batch_size, disable_tqdm=disable_tqdm, metadata=metadata
    )


# ===================================================================================== command line
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="qmop router",
        description="How much of the QMoP router's decision comes from the question, how much from the picture: "
        "variance shares, routed branch per question type, saturation, mutual information, flip rates.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (or Hub id) of a QMoP-LLaVA model with a router")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON (samples with `image` and `conversations`)")
    parser.add_argument("--image-folder", required=True, help="folder the samples' `image` paths are relative to")
    parser.add_argument("--pictures", type=int, default=100, help="pictures in the grid (default 100)")
    parser.add_argument("--questions", type=int, help="distinct questions in the grid, stratified by type (default all)")
    parser.add_argument("--type-field", default="dimension", help="sample field holding the question type")
    parser.add_argument("--seed", type=int, default=0, help="seed of the picture and question sampling")
    parser.add_argument("--batch-size", type=int, default=64, help="pictures / questions per encoder call")
    parser.add_argument("--output", help="write the diagnosis as JSON here")
    parser.add_argument("--markdown", help="write the markdown summary here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    if os.path.exists(args.model):
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            parser.error(f"--model {args.model} is not a checkpoint folder (no config.json)")
    elif not looks_like_hub_id(args.model):
        parser.error(f"--model {args.model}: no such folder")
    if not os.path.isfile(args.data):
        parser.error(f"--data {args.data}: no such file")
    if not os.path.isdir(args.image_folder):
        parser.error(f"--image-folder {args.image_folder}: no such folder")
    for name in ("pictures", "questions", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("output", "markdown"):
        path = getattr(args, name)
        if path is not None and os.path.isdir(path):
            parser.error(f"--{name} {path} is a folder; give a file path")

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bars
    try:
        diagnosis = diagnose_from_data(
            args.model,
            args.data,
            args.image_folder,
            num_pictures=args.pictures,
            num_questions=args.questions,
            type_field=args.type_field,
            seed=args.seed,
            batch_size=args.batch_size,
            disable_tqdm=args.quiet,
        )
    except DataError as error:
        parser.error(str(error))
    markdown = diagnosis.to_markdown()
    print(markdown)
    if args.output:
        write_atomic(args.output, json.dumps(diagnosis.to_dict(), indent=2) + "\n")
    if args.markdown:
        write_atomic(args.markdown, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
