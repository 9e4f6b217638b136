"""The mini VTCBench experiment: variants x seeds, each trained in two stages through `qmop_tools.train`, then
evaluated on the test split.

Every run is a job `(variant, seed)`: a base checkpoint (the frozen foundation + a projector initialised with the
seed) -> stage 1 (projector only, captions, `plain`) -> stage 2 (projector + LLM, VQA, `llava_hf`, the template the
processor's chat template renders) -> greedy answers to every test question. Jobs run in worker processes (one
thread each); a finished job leaves `runs/<variant>-s<seed>/result.json` and is not run again.

Speed: the vision tower is frozen and deterministic, so its output for an image never changes. `FeatureCache`
memoises `QMoPModel.get_vision_features` by the bytes of each image's pixel values: exact, and it saves running
the 577-token tower on every step (the LLM, text encoder, router and branches still run every time).
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from qmop_tools.bench.report import write_atomic
from qmop_tools.progress import library_bars, progress_bar

logger = logging.getLogger(__name__)

ALL_BRANCHES = ["pooling", "resampler", "pruning"]
JOB_INDEPENDENT = ("variants", "seeds", "workers", "budgets_seeds", "reader_probe_steps")
# In a job's key only as its own `stage2_epochs` (`Settings.job_key`), so keys of runs made before it existed stay valid.
PER_VARIANT = ("budgets_stage2_epochs",)
# Router training for the routed variants (each a config field; docs/vtcbench.md explains them): the softmax keeps a
# gradient (logits capped at +-1, so at the 0.5 floor the top branch gets at most ~0.96; z-loss) and shows its real
# preference at inference (1.0); no batch load balancing, which a router meets by splitting pictures whatever the
# question. Stage 1 routes uniformly (the trainer's default). Without the cap, a first run collapsed onto pooling
# within one epoch of stage 2 (weight 0.9995, 99% saturated): the z-loss bounds logsumexp, not the gap.
ROUTER_TRAINING = {"router_min_temperature": 0.5, "router_eval_temperature": 1.0, "router_aux_loss_coef": 0.0,
                   "router_z_loss_coef": 0.001, "router_logit_cap": 1.0}
VARIANTS = {
    "qmop": {"branches": ALL_BRANCHES, "router_mode": "query", "router_top_k": 2, **ROUTER_TRAINING},
    "pooling": {"branches": ["pooling"], "router_top_k": 1},
    "resampler": {"branches": ["resampler"], "router_top_k": 1},
    "pruning": {"branches": ["pruning"], "router_top_k": 1},
    # The same router with logits normalized instead of tanh-capped (`router_logit_cap_mode`): in the first data-v5
    # run the tanh cap saturated (every logit at +-1 for every question, routing constant), leaving no gradient.
    "qmop_normalized": {"branches": ALL_BRANCHES, "router_mode": "query", "router_top_k": 2, **ROUTER_TRAINING,
                        "router_logit_cap_mode": "normalize"},
    # The router trained by outcome (`router_training="outcome"`): one branch drawn uniformly per training image, the
    # router regresses that branch's LM loss and picks the lowest predicted loss at inference. Both softmax routers
    # above ended routing every question alike; this one gets a learning signal for every branch.
    "qmop_outcome": {"branches": ALL_BRANCHES, "router_mode": "query", "router_training": "outcome",
                     "router_eval_temperature": 1.0, "router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0},
    # The same with exploration 0.25 (epsilon-greedy): three images in four go through the router's choice, so the
    # LLM mostly reads, for each kind of question, the branch chosen for it.
    "qmop_outcome_greedy": {"branches": ALL_BRANCHES, "router_mode": "query", "router_training": "outcome",
                            "router_exploration": 0.25, "router_eval_temperature": 1.0, "router_aux_loss_coef": 0.0,
                            "router_z_loss_coef": 0.0},
    # The outcome router with every training image sent through every branch (`router_outcome_branches="all"`: three
    # LLM passes a batch). With one random branch per image the LLM never learned the background colour through any
    # branch (global 20-25%, the same with the router's loss off): each branch here gets a single-branch run's data.
    "qmop_outcome_all": {"branches": ALL_BRANCHES, "router_mode": "query", "router_training": "outcome",
                         "router_outcome_branches": "all", "router_eval_temperature": 1.0, "router_aux_loss_coef": 0.0,
                         "router_z_loss_coef": 0.0},
    # The same router without the question (`router_mode="vision"`), trained the same way: what reading the question
    # adds when nothing else differs.
    "vision_outcome_all": {"branches": ALL_BRANCHES, "router_mode": "vision", "router_training": "outcome",
                           "router_outcome_branches": "all", "router_eval_temperature": 1.0,
                           "router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0},
    "uniform": {"branches": ALL_BRANCHES, "router_mode": "uniform"},
    "vision_router": {"branches": ALL_BRANCHES, "router_mode": "vision", "router_top_k": 2, **ROUTER_TRAINING},
    "random_k": {"branches": ["pruning"], "router_top_k": 1, "pruning_score": "random"},
    # The pooling branch on pictures reduced to sqrt(M) x sqrt(M) patches' worth of pixels (`DOWNSAMPLED_IMAGES`).
    "downsample": {"branches": ["pooling"], "router_top_k": 1},
    "full576": {"branches": ["pooling"], "router_top_k": 1, "num_visual_tokens": 576},
    # QG-VTC inside the tower (docs/compression.md): the paper's schedule scaled to this 3-layer tower keeps the 72
    # patches (of 576) most relevant to the question after its last layer; pooling then averages the kept ones per cell.
    "qg_vtc": {"branches": ["pooling"], "router_top_k": 1, "tower_pruning_schedule": "qg_vtc"},
    # LearnPruner's learned pruner after the tower (`pruning_score="learned"`), against the salience pruning branch.
    "learned_pruner": {"branches": ["pruning"], "router_top_k": 1, "pruning_score": "learned"},
    # LearnPruner's second step: the pooling branch's 36 tokens, of which the question's 9 most attended stay from the
    # LLM's second (last) decoder layer on; against pooling only.
    "llm_pruning": {"branches": ["pooling"], "router_top_k": 1, "llm_pruning_layer": 1, "llm_pruning_keep": 9},
    # A Mixture-of-Experts LLM (issue #16): the foundation LLM upcycled into a Mixtral with `llm_experts` experts, 2 per
    # token (`qmop_tools.moe.upcycle_to_mixtral`, same function at the start), trained with its load-balancing loss;
    # without and with SMoES' modality-bin regulariser. Pooling only, so nothing but the LLM differs from "pooling".
    "pooling_moe": {"branches": ["pooling"], "router_top_k": 1, "llm_experts": 4},
    "pooling_moe_smoes": {"branches": ["pooling"], "router_top_k": 1, "llm_experts": 4, "smoes_loss_coef": 0.1},
    # At 0.1 the regulariser split the experts by modality almost completely and cost accuracy: a tenth of it.
    "pooling_moe_smoes_weak": {"branches": ["pooling"], "router_top_k": 1, "llm_experts": 4, "smoes_loss_coef": 0.01},
    # QMoP trained with a budget drawn per batch from `BUDGET_SET`, evaluated at each (the bundled checkpoint until
    # 2026-12-05).
    "qmop_budgets": {"branches": ALL_BRANCHES, "router_mode": "query", "router_top_k": 2, **ROUTER_TRAINING},
    # The same budget sampling with the router trained by outcome through every branch: the bundled checkpoint.
    "qmop_outcome_all_budgets": {"branches": ALL_BRANCHES, "router_mode": "query", "router_training": "outcome",
                                 "router_outcome_branches": "all", "router_eval_temperature": 1.0,
                                 "router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0},
}
# The two outcome routers through every branch with their inputs standardised by running statistics
# (`router_input_norm`): CLIP's question embeddings share one large direction (mean embeddings of the local and spatial
# questions: cosine 0.998), and routers trained offline on the targets of a finished run sent spatial questions to
# pruning with LayerNorm alone (spatial 78.0-78.5) and to pooling once standardised (93.5-96.5; docs/vtcbench.md).
VARIANTS |= {f"{variant}_std": {**VARIANTS[variant], "router_input_norm": "standardize"}
             for variant in ("qmop_outcome_all", "vision_outcome_all")}
# Variants trained with a budget drawn per batch from `BUDGET_SET` and evaluated at each; their seeds are
# `Settings.budgets_seeds`.
BUDGET_VARIANTS = ("qmop_budgets", "qmop_outcome_all_budgets")
# What the acceptance checks of issue #11 read (`--acceptance`): the outcome-trained QMoP, its question-blind twin, the
# three single branches, equal-weight fusion and the uncompressed model. Measured on 2026-12-06 (idle 2-core CPU, two
# workers, data version 6, counting x3; seconds per seed): about 440 + 420 + 190 x 4 + 1390 (full576); the three seeds
# and the budget-sampled export run took 83 min after the foundation (docs/vtcbench.md, "The counting gate").
# Since 2026-12-07 the two routers read standardised inputs (`router_input_norm`); the LayerNorm pair
# (qmop_outcome_all, vision_outcome_all) is the acceptance set of docs/results/vtcbench-lr1e-3.md.
ACCEPTANCE_VARIANTS = ("qmop_outcome_all_std", "vision_outcome_all_std", "pooling", "resampler", "pruning", "uniform",
                       "full576")
# The variants a run may export as the bundled checkpoint, in order of preference (`report.best_qmop_run`).
EXPORTABLE = ("qmop_outcome_all_budgets", "qmop_budgets", "qmop")
VARIANT_LABELS = {
    "qmop": "QMoP (query-guided router)",
    "qmop_normalized": "QMoP, router logits normalized (not tanh-capped)",
    "qmop_outcome": "QMoP, router trained by outcome (loss per branch)",
    "qmop_outcome_greedy": "QMoP, router trained by outcome, exploration 0.25",
    "qmop_outcome_all": "QMoP, router trained by outcome, every branch per image",
    "vision_outcome_all": "router without the question, trained by outcome, every branch per image",
    "qmop_outcome_all_std": "QMoP, router trained by outcome through every branch, inputs standardised",
    "vision_outcome_all_std": ("router without the question, trained by outcome, every branch per image, inputs "
                               "standardised"),
    "pooling": "pooling only",
    "resampler": "resampler only",
    "pruning": "pruning only (salience)",
    "uniform": "equal-weight fusion of all three",
    "vision_router": "QMoP, router without the question",
    "random_k": "random-k patches",
    "downsample": "image downsampled to 36 patches",
    "full576": "uncompressed, 576 tokens",
    "qg_vtc": "QG-VTC tower pruning (72 kept) + pooling",
    "learned_pruner": "pruning only (LearnPruner's learned score)",
    "llm_pruning": "pooling + mid-LLM pruning (9 kept from layer 1)",
    "qmop_budgets": "QMoP, one checkpoint for budgets 16/36/64/144",
    "qmop_outcome_all_budgets": "QMoP, router trained by outcome through every branch, one checkpoint for budgets 16/36/64/144",
    "pooling_moe": "pooling only, MoE LLM (upcycled, 4 experts)",
    "pooling_moe_smoes": "pooling only, MoE LLM + SMoES (0.1)",
    "pooling_moe_smoes_weak": "pooling only, MoE LLM + SMoES (0.01)",
}
BUDGET_SET = (16, 36, 64, 144)
DIAGNOSTIC_PICTURES = 100  # test pictures in the router diagnostic's grid (x every distinct test question)
DOWNSAMPLED_IMAGES = "images_downsampled"  # `data.write_downsampled`: the downsample variant's pictures


@dataclass
class Settings:
    train_images: int = 1600
    val_images: int = 200
    test_images: int = 200
    data_seed: int = 0
    # `data.LAYOUTS`: "tag" is data version 6; "pair" (adopted 2026-12-06) puts a decoy letter next to the tag inside
    # one pooling cell, so that the letter is a look-up in the tag's own patches (data.py; docs/vtcbench.md, "Data
    # layout pair"): with local x3 below, pruning and 576 tokens read it at 98-100%, pooling at 29.
    data_layout: str = "pair"
    # `data.GLYPH_TARGETS`: what the tower's per-patch glyph head names, the letter (recipe 4) or the patch's ink
    # pattern, with which pooling loses the letter in the features (docs/vtcbench.md, "Data layout pair").
    glyph_target: str = "letter"
    # The tag's letter is read per patch only late: balanced letter accuracy 16% at 100 steps, 17% at 400, 46% at 500,
    # 71% at 700, 75% at 800 (docs/vtcbench.md, "Foundation gates"); at 200 steps it was at chance.
    clip_steps: int = 800
    clip_batch_size: int = 32
    text_steps: int = 200
    llm_steps: int = 300
    budget: int = 36
    variants: list = field(default_factory=lambda: [v for v in VARIANTS])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    budgets_seeds: list = field(default_factory=lambda: [0])  # seeds of the qmop_budgets variant
    batch_size: int = 32
    stage1_epochs: float = 1.0
    stage2_epochs: float = 3.0
    # Stage-2 epochs of the budget-sampled variants (`BUDGET_VARIANTS`), which see each budget a quarter of the time.
    budgets_stage2_epochs: float = 3.0
    # How many times each question of a dimension is seen per epoch of stage 2 (`weighted_vqa`), others once. Counting
    # is learnt last: through all 576 tokens the reader probe reached 88% on counting alone in 400 steps, 37% in the
    # mixed 750, 67.5% with counting x3 (1050 steps; docs/vtcbench.md, "The counting gate"). On the pair layout the
    # letter is a look-up that 576 tokens learn only with local x3 (14.7% at counting x3, 98.5% in the reader probe
    # with local x3; "A local weight"). Every variant gets it: 1,350 stage-2 steps.
    stage2_weights: str = "counting=3,local=3"
    stage1_lr: float = 2e-3
    # At 2e-3 some seeds of every variant that does not pool left an answer at chance (the background's colour: a
    # run answered one or two colours for every picture); at 1e-3 fusion and QMoP learnt it in every seed
    # (docs/vtcbench.md, "Dimensions stuck at chance: half the stage-2 learning rate").
    stage2_lr: float = 1e-3
    workers: int = 2
    eval_batch_size: int = 50
    # The reader probe on 36 pooled tokens after the foundation (`reader_probe.py`; 0 = skip): which dimensions the
    # tower's tokens let an LLM of this size learn at all, in about 3 minutes.
    reader_probe_steps: int = 1500

    @classmethod
    def smoke(cls) -> "Settings":
        return cls(train_images=40, val_images=10, test_images=10, clip_steps=3, clip_batch_size=16, text_steps=3,
                   llm_steps=5, variants=["qmop", "downsample", "qmop_outcome_all_budgets", "qg_vtc"], seeds=[0],
                   batch_size=8, stage1_epochs=0.25, stage2_epochs=0.25, budgets_stage2_epochs=0.25, workers=1,
                   eval_batch_size=25, reader_probe_steps=3)

    def jobs(self) -> list:
        return [(v, s) for v in self.variants for s in (self.budgets_seeds if v in BUDGET_VARIANTS else self.seeds)]

    def job_key(self, variant: str) -> dict:
        """Everything a job's result depends on: a finished job is reused only when this is unchanged."""
        from .data import data_version
        from .towers import foundation_recipe

        # The layout is in the data version and the glyph target in the recipe (so keys of runs made before either
        # existed stay valid).
        key = {k: v for k, v in asdict(self).items()
               if k not in JOB_INDEPENDENT + PER_VARIANT and k not in ("data_layout", "glyph_target")}
        key["stage2_epochs"] = self.stage2_epochs_for(variant)
        key |= {"variant_config": self.qmop_settings(variant), "data_version": data_version(self.data_layout),
                "foundation": foundation_recipe(self.glyph_target), "train_budgets": self.train_budgets(variant),
                "images": self.image_folder(variant)}
        return json.loads(json.dumps(key))  # as stored in result.json (tuples become lists), so equal keys compare equal

    def qmop_settings(self, variant: str) -> dict:
        settings = {"num_visual_tokens": self.budget, "router_hidden_size": 64, "resampler_num_layers": 1}
        settings.update(VARIANTS[variant])
        return settings

    def stage2_epochs_for(self, variant: str) -> float:
        return self.budgets_stage2_epochs if variant in BUDGET_VARIANTS else self.stage2_epochs

    def train_budgets(self, variant: str) -> Optional[tuple]:
        return BUDGET_SET if variant in BUDGET_VARIANTS else None

    def eval_budgets(self, variant: str) -> list:
        return list(BUDGET_SET) if variant in BUDGET_VARIANTS else [self.qmop_settings(variant)["num_visual_tokens"]]

    @staticmethod
    def image_folder(variant: str) -> str:
        return DOWNSAMPLED_IMAGES if variant == "downsample" else "images"


# ===================================================================================== feature cache
class FeatureCache:
    """Memoises `QMoPModel.get_vision_features` per (vision tower weights, image): exact while the tower is frozen.
    Models with the same tower weights (every run here starts from the same pre-trained tower) share entries."""

    def __init__(self):
        self.store = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(pixel_row: torch.Tensor) -> bytes:
        return hashlib.blake2b(pixel_row.detach().contiguous().cpu().numpy().tobytes(), digest_size=16).digest()

    @staticmethod
    def fingerprint(module: torch.nn.Module) -> bytes:
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
        return digest.digest()

    def install(self, model) -> bool:
        """Wrap the model's `get_vision_features` with the cache; not for a model whose tower prunes by the question
        (`tower_pruning_schedule`), whose tower output is no longer a function of the image alone. Returns whether
        the cache was installed."""
        core = model.model if hasattr(model, "model") and hasattr(model.model, "get_vision_features") else model
        if getattr(core.config, "uses_tower_pruning", False):
            return False
        original = core.get_vision_features
        tower = self.fingerprint(core.vision_tower)
        index = core.config.vision_feature_hidden_state_index
        feature_layer = core.vision_tower.encoder.layers[index - 1] if index > 0 else None
        cache = self

        def get_vision_features(pixel_values):
            keys = [tower + cache.key(row) for row in pixel_values]
            missing = [i for i, k in enumerate(keys) if k not in cache.store]
            if missing:
                with torch.no_grad():
                    hidden, layer_input, _ = original(pixel_values[missing])
                for row, i in enumerate(missing):
                    cache.store[keys[i]] = (hidden[row].clone(), None if layer_input is None else layer_input[row].clone())
            cache.hits += len(keys) - len(missing)
            cache.misses += len(missing)
            hidden = torch.stack([cache.store[k][0] for k in keys])
            layer_input = None if feature_layer is None else torch.stack([cache.store[k][1] for k in keys])
            return hidden, layer_input, feature_layer

        core.get_vision_features = get_vision_features
        return True


_WORKER_CACHE = FeatureCache()


# ===================================================================================== one job
def _training_arguments(output_dir: str, settings: Settings, stage: int, seed: int, epochs: float):
    from transformers import TrainingArguments

    # transformers 5 folds warmup_ratio into warmup_steps (a float below 1 is a ratio); 4.57 has both.
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = {"warmup_ratio": 0.05} if "warmup_ratio" in names else {"warmup_steps": 0.05}
    return TrainingArguments(
        **warmup,
        output_dir=output_dir,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.stage1_lr if stage == 1 else settings.stage2_lr,
        num_train_epochs=epochs,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
    )


def weighted_vqa(data_dir: str, weights: str) -> str:
    """The stage-2 training file: `train_vqa.json` itself without weights, else `train_vqa-<dimension>x<N>....json`
    next to it with each question of a weighted dimension written N times in a row (the trainer shuffles), written
    once (atomically) and reused."""
    from .data import parse_dimension_weights

    parsed = parse_dimension_weights(weights)
    source = os.path.join(data_dir, "train_vqa.json")
    if all(n == 1 for n in parsed.values()):
        return source
    target = os.path.join(data_dir, "train_vqa-" + "-".join(f"{d}x{n}" for d, n in sorted(parsed.items())) + ".json")
    if os.path.exists(target) and os.path.getmtime(target) >= os.path.getmtime(source):
        return target
    with open(source) as f:
        samples = json.load(f)
    repeated = [sample for sample in samples for _ in range(parsed.get(sample["dimension"], 1))]
    write_atomic(target, json.dumps(repeated))
    return target


def _train_stage(model_dir: str, output_dir: str, data_dir: str, settings: Settings, stage: int, seed: int,
                 epochs: float, images: str = "images", budgets: Optional[tuple] = None) -> dict:
    from transformers import TrainerCallback

    from qmop_tools.train import DataArguments, ModelArguments, run

    class InstallCache(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from qmop_tools.train import unwrap_qmop

            _WORKER_CACHE.install(unwrap_qmop(model))

    model_args = ModelArguments(model_name_or_path=model_dir, stage=stage)
    data_args = DataArguments(
        data_path=os.path.join(data_dir, "train_captions.json") if stage == 1
        else weighted_vqa(data_dir, settings.stage2_weights),
        image_folder=os.path.join(data_dir, images),
        template="plain" if stage == 1 else "llava_hf",
        model_max_length=1024,
        train_budgets=",".join(map(str, budgets)) if budgets else None,
        cache_samples=True,  # 3 epochs of 8,000 small samples: encoding them again costs half of each step
    )
    result = run(model_args, data_args, _training_arguments(output_dir, settings, stage, seed, epochs),
                 callbacks=[InstallCache()])
    history = [entry for entry in result.trainer.state.log_history if "loss" in entry]
    return {
        "train_loss": result.metrics.get("train_loss"),
        "train_runtime": result.metrics.get("train_runtime"),
        "steps": result.trainer.state.global_step,
        "loss_curve": [(entry["step"], round(entry["loss"], 4)) for entry in history],
        "skipped_samples": result.metrics.get("skipped_samples"),
    }


def _with_forced_branches(result: dict, run_dir: str, output: str, variant: str, settings: Settings) -> dict:
    """A finished routed run from before forced-branch evaluation existed gets it added (its model is kept)."""
    model_dir = os.path.join(run_dir, "model")
    routed = VARIANTS[variant].get("router_mode") in ("query", "vision")
    if "forced_branches" in result or not routed or not os.path.isdir(model_dir):
        return result
    start = time.time()
    result["forced_branches"] = forced_branch_evaluation(model_dir, os.path.join(output, "data"), "test",
                                                         settings.eval_batch_size, images=settings.image_folder(variant))
    result["forced_branches_seconds"] = round(time.time() - start, 1)
    write_atomic(os.path.join(run_dir, "result.json"), json.dumps(result, indent=1))
    return result


def run_job(output: str, variant: str, seed: int, settings: Settings) -> dict:
    """Train one (variant, seed) in two stages and evaluate it; returns (and writes) its result."""
    from transformers import AutoProcessor

    from .towers import base_checkpoint
    from transformers import CLIPModel, LlamaForCausalLM

    name = f"{variant}-s{seed}"
    run_dir = os.path.join(output, "runs", name)
    result_path = os.path.join(run_dir, "result.json")
    key = settings.job_key(variant)
    if os.path.exists(result_path):
        with open(result_path) as f:
            previous = json.load(f)
        if previous.get("job_key") == key:
            return _with_forced_branches(previous, run_dir, output, variant, settings)
        logger.info("%s: settings changed since it ran, training it again", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.time()
    data_dir = os.path.join(output, "data")
    foundation = os.path.join(output, "foundation")
    processor = AutoProcessor.from_pretrained(os.path.join(foundation, "processor"), trust_remote_code=True)
    clip = CLIPModel.from_pretrained(os.path.join(foundation, "clip"))
    llm = LlamaForCausalLM.from_pretrained(os.path.join(foundation, "llm"))
    settings_for_variant = settings.qmop_settings(variant)
    processor.num_visual_tokens = settings_for_variant["num_visual_tokens"]
    images, budgets = settings.image_folder(variant), settings.train_budgets(variant)
    qmop_fields = {k: v for k, v in settings_for_variant.items() if k != "llm_experts"}
    if "llm_experts" in settings_for_variant:
        from ..moe import upcycle_to_mixtral

        llm = upcycle_to_mixtral(llm, num_experts=settings_for_variant["llm_experts"], top_k=2, seed=seed)
    base = base_checkpoint(os.path.join(run_dir, "base"), processor, clip, llm, seed=seed, **qmop_fields)
    stage1 = _train_stage(base, os.path.join(run_dir, "stage1"), data_dir, settings, stage=1, seed=seed,
                          epochs=settings.stage1_epochs, images=images, budgets=budgets)
    stage2 = _train_stage(os.path.join(run_dir, "stage1"), os.path.join(run_dir, "model"), data_dir, settings,
                          stage=2, seed=seed, epochs=settings.stage2_epochs_for(variant), images=images,
                          budgets=budgets)
    for leftover in ("base", "stage1"):
        shutil.rmtree(os.path.join(run_dir, leftover), ignore_errors=True)
    model_dir = os.path.join(run_dir, "model")
    splits = ["test", "val"] if variant in EXPORTABLE else ["test"]
    evaluation, predictions = {}, None
    for budget in settings.eval_budgets(variant):
        suffix = "" if budget == settings_for_variant["num_visual_tokens"] else f"@{budget}"
        for split in splits:
            e = evaluate(model_dir, data_dir, split, settings.eval_batch_size, images=images, num_visual_tokens=budget)
            evaluation[split + suffix] = {k: v for k, v in e.items() if k != "predictions"}
            if split == "test" and not suffix:
                predictions = e["predictions"]
    diagnostics = forced = None
    if VARIANTS[variant].get("router_mode") in ("query", "vision"):
        forced = forced_branch_evaluation(model_dir, data_dir, "test", settings.eval_batch_size, images=images)
        from .router_diagnostics import diagnose_from_data

        diagnosis = diagnose_from_data(model_dir, os.path.join(data_dir, "test_vqa.json"), os.path.join(data_dir, images),
                                       num_pictures=DIAGNOSTIC_PICTURES, seed=0, disable_tqdm=True)
        diagnostics = {k: v for k, v in diagnosis.to_dict().items() if k != "metadata"}
    moe_routing = None
    if "llm_experts" in settings_for_variant:
        moe_routing = moe_routing_on_test(model_dir, data_dir, images, settings.eval_batch_size)
    result = {
        "variant": variant,
        "seed": seed,
        "job_key": key,
        "moe_routing": moe_routing,
        "settings": settings_for_variant,
        "stage1": stage1,
        "stage2": stage2,
        "evaluation": evaluation,
        "router_diagnostics": diagnostics,
        "forced_branches": forced,
        "seconds": round(time.time() - start, 1),
        "feature_cache": {"hits": _WORKER_CACHE.hits, "misses": _WORKER_CACHE.misses},
    }
    write_atomic(os.path.join(run_dir, "predictions.json"), json.dumps(predictions))
    write_atomic(result_path, json.dumps(result, indent=1))
    logger.info("%s done in %.0f s: test accuracy %.3f", name, result["seconds"], result["evaluation"]["test"]["overall"])
    return result


@torch.no_grad()
def moe_routing_on_test(model_dir: str, data_dir: str, images: str, batch_size: int, limit: int = 200) -> dict:
    """`qmop_tools.moe.modality_routing_statistics` of a Mixture-of-Experts LLM over the prompts of the first `limit`
    test questions (as `evaluate` builds them)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..moe import modality_routing_statistics

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    with open(os.path.join(data_dir, "test_vqa.json")) as f:
        samples = json.load(f)[:limit]
    batches = []
    for begin in range(0, len(samples), batch_size):
        batch = samples[begin:begin + batch_size]
        pictures = [Image.open(os.path.join(data_dir, images, s["image"])).convert("RGB") for s in batch]
        prompts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": s["conversations"][0]["value"].replace("<image>", "").strip()}]}],
            add_generation_prompt=True) for s in batch]
        batches.append(processor(images=pictures, text=prompts, return_tensors="pt"))
    return modality_routing_statistics(model, batches)


# ===================================================================================== evaluation
def normalise_answer(text: str) -> str:
    words = text.strip().lower().split()
    return words[0].strip(".,!?;:'\"") if words else ""


@torch.no_grad()
def evaluate(model_dir: str, data_dir: str, split: str, batch_size: int = 50, limit: Optional[int] = None,
             model=None, processor=None, images: str = "images", num_visual_tokens: Optional[int] = None) -> dict:
    """Greedy answers (as a Hub user gets them: Auto* classes, the processor's chat template, `generate`) to every
    question of a split; exact match of the first word. Router weights are read from a forward pass of the same
    inputs."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if model is None:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
        _WORKER_CACHE.install(model)
    if processor is None:
        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    with open(os.path.join(data_dir, f"{split}_vqa.json")) as f:
        samples = json.load(f)[:limit]
    config = model.config
    routed = config.uses_router
    predictions = []
    for begin in range(0, len(samples), batch_size):
        batch = samples[begin:begin + batch_size]
        pictures = [Image.open(os.path.join(data_dir, images, s["image"])).convert("RGB") for s in batch]
        questions = [s["conversations"][0]["value"].replace("<image>", "").strip() for s in batch]
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
            )
            for q in questions
        ]
        extra = {} if num_visual_tokens is None else {"num_visual_tokens": num_visual_tokens}
        inputs = processor(images=pictures, text=prompts, return_tensors="pt", **extra)
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        weights = model(**inputs).router_weights.tolist() if routed else None
        for i, (sample, text) in enumerate(zip(batch, texts)):
            answer = sample["conversations"][1]["value"]
            predictions.append({
                "id": sample["id"],
                "dimension": sample["dimension"],
                "question": questions[i],
                "answer": answer,
                "prediction": text.strip(),
                "correct": normalise_answer(text) == answer,
                "router_weights": None if weights is None else [round(w, 4) for w in weights[i]],
            })
    return summarise_predictions(predictions, config.branches) | {"predictions": predictions}


def forced_branch_evaluation(model_dir: str, data_dir: str, split: str = "test", batch_size: int = 50,
                             images: str = "images") -> dict:
    """{branch: accuracy summary} of a routed model with each branch forced in turn: which branch answers each
    question type best inside this model (the oracle its router could reach by question type)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    _WORKER_CACHE.install(model)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    out = {}
    for branch in model.config.branches:
        with model.forced_branch(branch):
            summary = evaluate(model_dir, data_dir, split, batch_size, model=model, processor=processor, images=images)
        out[branch] = {"overall": summary["overall"], "per_dimension": summary["per_dimension"]}
    return out


def summarise_predictions(predictions: list, branches: list) -> dict:
    by_dimension = defaultdict(list)
    weights = defaultdict(list)
    for p in predictions:
        by_dimension[p["dimension"]].append(p["correct"])
        if p["router_weights"] is not None:
            weights[p["dimension"]].append(p["router_weights"])
    summary = {
        "overall": sum(p["correct"] for p in predictions) / len(predictions),
        "per_dimension": {d: sum(v) / len(v) for d, v in sorted(by_dimension.items())},
        "count": len(predictions),
    }
    if weights:
        summary["router_weights_per_dimension"] = {
            d: dict(zip(branches, torch.tensor(w).mean(0).tolist())) for d, w in sorted(weights.items())
        }
    return summary


# ===================================================================================== worker processes
def _worker_init(threads: int, quiet: bool = False) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(format="%(asctime)s %(processName)s %(message)s",
                        level=logging.WARNING if quiet else logging.INFO)
    for noisy in ("transformers", "qmop_tools.train"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run_job(output: str, variant: str, seed: int, settings: Settings, quiet: bool) -> dict:
    """`run_job` under the command's output policy, which a spawned worker does not inherit: transformers' bars as
    `library_bars` says, and under `quiet` what the trainer prints (its log dicts, "train metrics") goes nowhere (the
    result is returned and written to the run's folder all the same)."""
    with library_bars(quiet):
        if not quiet:
            return run_job(output, variant, seed, settings)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            return run_job(output, variant, seed, settings)


def run_jobs(output: str, settings: Settings, jobs: list, threads_per_worker: int = 1, quiet: bool = False) -> list:
    """Run (variant, seed) jobs, longest first (576 tokens, longer training), in `settings.workers` processes; a bar
    counts finished runs (none with `quiet`). Results come back in the order of the sorted jobs."""
    jobs = sorted(jobs, key=lambda job: (job[0] not in ("full576", *BUDGET_VARIANTS), job))
    bar = progress_bar(total=len(jobs), desc="runs", unit="run", quiet=quiet)
    if settings.workers <= 1:
        _worker_init(max(1, threads_per_worker), quiet)
        results = []
        for variant, seed in jobs:
            bar.set_postfix_str(f"{variant} seed {seed}")
            results.append(_run_job(output, variant, seed, settings, quiet))
            bar.update()
        bar.close()
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(settings.workers, mp_context=context, initializer=_worker_init,
                             initargs=(threads_per_worker, quiet)) as pool:
        futures = {pool.submit(_run_job, output, variant, seed, settings, quiet): (variant, seed)
                   for variant, seed in jobs}
        for future in as_completed(futures):
            variant, seed = futures[future]
            bar.set_postfix_str(f"{variant} seed {seed} done")
            bar.update()
        bar.close()
        return [future.result() for future in futures]


def settings_dict(settings: Settings) -> dict:
    return asdict(settings)
