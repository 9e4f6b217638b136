"""`convert(settings)`: a LLaVA-1.5 checkpoint (llava-hf or the original liuhaotian layout) plus a CLIP checkpoint
into QMoP-LLaVA, verified numerically, written as a complete, Hub-ready folder.

What comes from where:
    LLaVA vision tower (CLIP ViT)   -> model.vision_tower.*         (from --clip / --vision-tower when the
                                                                      original LLaVA checkpoint does not store it)
    LLaVA projector (mlp2x_gelu)    -> model.projector.<branch>_branch.expert.linear_{1,2}.*   (copied per branch)
    LLaVA language model + lm_head  -> model.language_model.*, lm_head.*
    CLIP text tower                 -> model.text_encoder.*        (its tokenizer becomes the query tokenizer)
    freshly initialised (seeded)    -> resampler cross-attention layers and query embedding, router,
                                       question projections of the "question_relevance" pruning score and of
                                       QG-VTC tower pruning (`projector.tower_pruner`)

The steps, each in its own module: the settings are checked (settings.py), the sources read (sources.py), every key
renamed by exactly one rule (keys.py) and the models assembled strictly (assemble.py). Verification happens before
anything is written (verify.py): the converted weights, viewed as QMoP with `num_visual_tokens = number of patches`
and `branches = ["pooling"]`, must give the same logits (and greedy tokens) as transformers' own
`LlavaForConditionalGeneration` on fixed inputs; the requested model then runs a forward and a short greedy
generation. The folder is written to a temporary directory next to the output, reloaded through
`AutoModelForImageTextToText` / `AutoProcessor` with `trust_remote_code=True`, checked again, given its model card
(card.py), and only then moved into place; then, if asked, pushed (hub.py).

Progress goes to stderr: a numbered step line per stage (INFO on the `qmop.conversion` logger) and, on a terminal
unless `quiet`, progress bars (qmop_tools/progress.py): reading each source's tensors, and transformers' own
(loading weights, writing shards). stdout carries only the check results.
"""

import gc
import logging
import os
import shutil
import tempfile
import time
from typing import Optional

import torch

from conversion.assemble import (
    assemble_llava_reference,
    assemble_qmop,
    build_processor,
    build_qmop_config,
    read_converted_tensors,
)
from conversion.card import model_card
from conversion.hub import push_folder
from conversion.settings import (
    DEFAULT_ATOL,
    DTYPES,
    ConversionError,
    ConversionReport,
    ConversionSettings,
    parse_shard_size,
    validate_settings,
)
from conversion.sources import LLAVA_HF, ORIGINAL, load_sources
from conversion.verify import (
    check_llava_parity,
    check_requested_model,
    run_checks,
    verification_image,
    verification_inputs,
    verify_saved,
)
from qmop_tools.progress import library_bars

logger = logging.getLogger("qmop.conversion")

# Stage at which an environment variable can make the converter pause (used by the interruption test).
PAUSE_ENV = "QMOP_CONVERT_PAUSE_AFTER"


def _pause_if_requested(stage: str) -> None:
    """Testing hook: with QMOP_CONVERT_PAUSE_AFTER=<stage>, announce the stage and wait (to be killed)."""
    if os.environ.get(PAUSE_ENV) == stage:
        print(f"QMOP_CONVERT_PAUSED {stage}", flush=True)
        time.sleep(3600)


def _move_into_place(staging: str, output: str, workdir: str, replace: Optional[os.stat_result]) -> None:
    """Move the finished folder to --output. With --overwrite, only the very folder that existed at the start is
    replaced; anything that appeared at --output during the run is left alone, and the result is kept beside it."""
    if os.path.lexists(output):
        current = os.lstat(output)
        if replace is None or (current.st_ino, current.st_dev) != (replace.st_ino, replace.st_dev):
            kept = tempfile.mkdtemp(dir=os.path.dirname(output), prefix=f"{os.path.basename(output)}.converted-")
            os.replace(staging, os.path.join(kept, "checkpoint"))
            raise ConversionError(
                f"--output {output} appeared while converting (another process?) and was left untouched; the "
                f"verified conversion is in {os.path.join(kept, 'checkpoint')}."
            )
        os.replace(output, os.path.join(workdir, "replaced"))  # --overwrite: deleted with the work dir
    os.replace(staging, output)


class Steps:
    """Numbered step lines: each call logs "step k/total: message" at INFO, k counting the calls."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0

    def __call__(self, message: str, *args) -> None:
        self.done += 1
        logger.info("step %d/%d: " + message, self.done, self.total, *args)


def convert(settings: ConversionSettings) -> ConversionReport:
    """Run the whole conversion; see the module docstring. Raises ConversionError on any failed check."""
    output = os.path.abspath(settings.output)
    validate_settings(settings)
    replace = os.lstat(output) if os.path.lexists(output) else None  # what --overwrite may replace
    # transformers' bars do not look for a terminal themselves: they follow the converter's.
    with library_bars(quiet=settings.quiet):
        return _convert(settings, output, replace, Steps(total=7 + bool(settings.push_to_hub)))


def _convert(settings: ConversionSettings, output: str, replace: Optional[os.stat_result], step: Steps) -> ConversionReport:
    branches = list(settings.branches)
    step("reading the configs and tokenizers of %s and %s", settings.llava, settings.clip)
    sources = load_sources(settings)
    pad_to_square = settings.pad_to_square
    if pad_to_square is None:
        pad_to_square = sources.layout == ORIGINAL or bool(getattr(sources.image_processor, "do_pad", False))
    config = build_qmop_config(sources, settings.num_visual_tokens, branches, pad_to_square, settings.config_overrides)
    reference_config = build_qmop_config(sources, config.num_patches, ["pooling"], pad_to_square)
    processor = build_processor(sources, settings.num_visual_tokens, pad_to_square)
    image = verification_image(sources.vision_config.image_size)
    reference_inputs = verification_inputs(processor, image, config.num_patches, for_llava=True)
    reference_inputs_qmop = verification_inputs(processor, image, config.num_patches)
    inputs = verification_inputs(processor, image, config.num_visual_tokens)
    new_tokens = settings.verify_new_tokens

    # 1. transformers' LLaVA on fixed inputs (llava-hf: loaded by transformers itself, independent of our rules).
    requested_dtype = None if settings.dtype == "auto" else DTYPES[settings.dtype]
    llava_checks = None
    if sources.layout == LLAVA_HF:
        from transformers import LlavaForConditionalGeneration

        step("LLaVA reference: transformers' LlavaForConditionalGeneration from %s, forward and generation",
             sources.llava_dir)
        llava = LlavaForConditionalGeneration.from_pretrained(sources.llava_dir, dtype=requested_dtype or "auto").eval()
        llava_checks = run_checks(llava, reference_inputs, settings.device, new_tokens)
        llava = None
        gc.collect()

    # 2. map every weight.
    step("reading and renaming the weights")
    tensors, dtype = read_converted_tensors(sources, requested_dtype, quiet=settings.quiet)
    atol = settings.atol if settings.atol is not None else DEFAULT_ATOL[dtype]
    if sources.layout == ORIGINAL:
        step("LLaVA reference: LlavaForConditionalGeneration on the converted weights (original layout), forward "
             "and generation")
        llava = assemble_llava_reference(sources, config, tensors)
        llava_checks = run_checks(llava, reference_inputs, settings.device, new_tokens)
        llava = None
        gc.collect()

    # 3. the same weights as QMoP with all patches and pooling only must be LLaVA.
    step("LLaVA parity: QMoP with %d tokens and the pooling branch, forward and generation", config.num_patches)
    reference, _ = assemble_qmop(reference_config, tensors, dtype, settings.seed)
    qmop_checks = run_checks(reference, reference_inputs_qmop, settings.device, new_tokens)
    reference = None
    gc.collect()
    reference_diff, tokens_equal = check_llava_parity(qmop_checks, llava_checks, atol, config.num_patches)

    # 4. the requested model: forward and a short generation.
    step("the requested model (M=%d, branches %s): forward and generation", config.num_visual_tokens,
         ", ".join(branches))
    model, fresh = assemble_qmop(config, tensors, dtype, settings.seed)
    del tensors
    model.generation_config = sources.generation_config
    logits, generated_text = check_requested_model(model, processor, inputs, settings.device, new_tokens)
    model.to("cpu")
    num_parameters = sum(p.numel() for p in model.parameters())

    # 5. write to a temporary folder, reload it through Auto*, then move it into place.
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output)}.incomplete-")
    staging = os.path.join(workdir, "checkpoint")
    try:
        step("saving %.2f GB of weights to %s", num_parameters * torch.finfo(dtype).bits / 8 / 1e9, staging)
        model.save_pretrained(staging, max_shard_size=parse_shard_size(settings.max_shard_size))
        processor.save_pretrained(staging)
        model = None
        gc.collect()
        _pause_if_requested("saved")

        step("reload check: the saved folder through Auto* with trust_remote_code")
        reload_diff = verify_saved(staging, image, inputs, logits, dtype, settings.device, atol)
        summary = {"layout": sources.layout, "dtype": str(dtype).replace("torch.", ""),
                   "reference_max_abs_diff": reference_diff, "reload_max_abs_diff": reload_diff}
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(model_card(settings, config, summary, fresh))
        _pause_if_requested("verified")
        _move_into_place(staging, output, workdir, replace)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {output}", flush=True)

    pushed = None
    if settings.push_to_hub:
        step("pushing %s to %s", output, settings.push_to_hub)
        pushed = push_folder(output, settings.push_to_hub, settings.private, settings.token)
    return ConversionReport(
        output=output, layout=sources.layout, dtype=str(dtype).replace("torch.", ""),
        reference_max_abs_diff=reference_diff, reference_tokens_equal=tokens_equal, reload_max_abs_diff=reload_diff,
        generated_text=generated_text, fresh_keys=fresh, num_parameters=num_parameters, pushed_to=pushed,
    )
