"""One command from nothing to the mini VTCBench's results: data, foundation, all runs, table, plot, pictures.

    qmop vtcbench --output outputs/vtcbench [--smoke] [--export-checkpoint checkpoints/qmop-tiny]
                                  [--export-demo-image assets/demo.png]

Every stage leaves its output on disk and is skipped when run again with the same settings (delete the folder, or
pass --fresh, to start over).
"""

import json
import logging
import math
import os
import shutil
import time

from qmop_tools.bench.report import write_atomic
from qmop_tools.progress import progress_bar

from .experiment import Settings, run_jobs, settings_dict

logger = logging.getLogger(__name__)


def _write_json(path: str, content) -> None:
    write_atomic(path, json.dumps(content, indent=1))


def prepare_data(output: str, settings: Settings) -> str:
    from .data import PATCH_SIZE, dataset_marker, write_dataset, write_downsampled
    from .experiment import DOWNSAMPLED_IMAGES

    data_dir = os.path.join(output, "data")
    sizes = {"train": settings.train_images, "val": settings.val_images, "test": settings.test_images}
    marker = os.path.join(data_dir, "dataset.json")
    fresh = True
    if os.path.exists(marker):
        with open(marker) as f:
            fresh = json.load(f) != dataset_marker(settings.data_seed, sizes, settings.data_layout)
    if fresh:
        start = time.time()
        write_dataset(data_dir, sizes, seed=settings.data_seed, layout=settings.data_layout)
        logger.info("data: %s images in %.0f s", sizes, time.time() - start)
    side = PATCH_SIZE * math.isqrt(settings.budget)
    downsampled = os.path.join(data_dir, DOWNSAMPLED_IMAGES)
    stamp = os.path.join(downsampled, "side.txt")
    if "downsample" in settings.variants and (fresh or not os.path.exists(stamp) or open(stamp).read() != str(side)):
        write_downsampled(data_dir, DOWNSAMPLED_IMAGES, side)
        write_atomic(stamp, str(side))
    return data_dir


def prepare_foundation(output: str, settings: Settings, parts=("tokenizers", "language", "vision")) -> dict:
    """The frozen foundation, in parts cached apart (each rebuilt only when its own settings change, so a new tower
    recipe does not retrain the LLM, and the language and vision parts can be built by two processes at once):
    "tokenizers" = tokenizers and processor; "language" = the text-pre-trained LLM; "vision" = the CLIP vision tower
    and text encoder (`towers.pretrain_clip`). Train split only."""
    from qmop_tools.files import save_pretrained_atomically
    from qmop_tools.testing.tiny import build_processor

    from .data import IMAGE_SIZE, PATCH_SIZE, corpus, data_version, generate_split
    from .towers import TowerShapes, foundation_recipe, pretrain_clip, pretrain_llm, tower_probe_report

    foundation = os.path.join(output, "foundation")
    data_dir = os.path.join(output, "data")
    shapes = TowerShapes()
    common = {"data_version": data_version(settings.data_layout), "train_images": settings.train_images,
              "data_seed": settings.data_seed, "shapes": shapes.__dict__}
    wanted = {
        "tokenizers": common,
        "language": common | {"llm_steps": settings.llm_steps},
        "vision": common | {"clip_steps": settings.clip_steps, "clip_batch_size": settings.clip_batch_size,
                            "text_steps": settings.text_steps, "recipe": foundation_recipe(settings.glyph_target)},
    }

    def cached(part):
        path = os.path.join(foundation, f"report-{part}.json")
        if os.path.exists(path):
            with open(path) as f:
                report = json.load(f)
            if report.get("settings") == wanted[part]:
                return report
        return None

    lines = corpus(generate_split("train", settings.train_images, settings.data_seed, settings.data_layout))
    if "tokenizers" in parts and cached("tokenizers") is None:
        processor = build_processor(settings.budget, IMAGE_SIZE, PATCH_SIZE, corpus=lines)
        os.makedirs(foundation, exist_ok=True)
        save_pretrained_atomically(os.path.join(foundation, "processor"), processor)
        _write_json(os.path.join(foundation, "report-tokenizers.json"),
                    {"settings": wanted["tokenizers"],
                     "vocab": {"llm": len(processor.tokenizer), "query": len(processor.query_tokenizer)}})
    if {"language", "vision"} & set(parts) and cached("tokenizers") is None:
        raise RuntimeError("The language and vision parts need the tokenizers: prepare them first.")
    if "language" in parts and cached("language") is None:
        from transformers import AutoTokenizer

        start = time.time()
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(foundation, "processor"))
        llm, llm_report = pretrain_llm(tokenizer, lines, shapes, steps=settings.llm_steps, seed=settings.data_seed)
        save_pretrained_atomically(os.path.join(foundation, "llm"), llm)
        logger.info("foundation, language part in %.0f s: LLM loss %.2f -> %.2f", time.time() - start,
                    llm_report["first_loss"], llm_report["last_loss"])
        _write_json(os.path.join(foundation, "report-language.json"), {"settings": wanted["language"], "llm": llm_report})
    if "vision" in parts and cached("vision") is None:
        from transformers import AutoProcessor

        start = time.time()
        processor = AutoProcessor.from_pretrained(os.path.join(foundation, "processor"), trust_remote_code=True)
        with open(os.path.join(data_dir, "train.json")) as f:
            records = json.load(f)
        with open(os.path.join(data_dir, "val.json")) as f:
            probe = json.load(f)[:100]
        clip, clip_report = pretrain_clip(processor, os.path.join(data_dir, "images"), records, shapes,
                                          steps=settings.clip_steps, batch_size=settings.clip_batch_size,
                                          seed=settings.data_seed, text_steps=settings.text_steps, val_records=probe,
                                          glyph_target=settings.glyph_target)
        clip_report["salience_pruning"] = tower_probe_report(clip, processor, os.path.join(data_dir, "images"), probe,
                                                             budget=settings.budget)
        save_pretrained_atomically(os.path.join(foundation, "clip"), clip)
        logger.info("foundation, vision part in %.0f s: tower heads on val %s; caption retrieval top-1 %.2f (chance "
                    "%.2f); salience pruning keeps %.0f%% of tag patches", time.time() - start,
                    clip_report["val_head_accuracy"], clip_report["val_caption_retrieval_top1"],
                    clip_report["val_caption_retrieval_chance"],
                    100 * clip_report["salience_pruning"]["tag_patches_kept"])
        _write_json(os.path.join(foundation, "report-vision.json"), {"settings": wanted["vision"], "clip": clip_report})
    tokenizers, language, vision = cached("tokenizers"), cached("language"), cached("vision")
    if None in (tokenizers, language, vision):
        return {}
    return {"settings": {"language": language["settings"], "vision": vision["settings"]}, "clip": vision["clip"],
            "llm": language["llm"], "vocab": tokenizers["vocab"]}


def run(output: str, settings: Settings, fresh: bool = False, export_checkpoint=None, export_demo=None,
        threads_per_worker=None, quiet: bool = False) -> dict:
    """Every stage in order. On a terminal, one bar follows the stages and one the (variant, seed) runs; `quiet`
    draws none (the log lines remain the record)."""
    from .report import write_report

    output = os.path.abspath(output)
    if fresh and os.path.exists(output):
        shutil.rmtree(output)
    os.makedirs(output, exist_ok=True)
    # A finished run is reused when its own settings (`Settings.job_key`) are unchanged; see `run_job`.
    _write_json(os.path.join(output, "settings.json"), settings_dict(settings))
    stages = ["data", "foundation"] + (["reader probe"] if settings.reader_probe_steps > 0 else []) + ["runs", "report"]
    bar = progress_bar(total=len(stages), desc="mini VTCBench", unit="stage", quiet=quiet)

    def stage_done() -> None:
        bar.update()
        if bar.n < len(stages):
            bar.set_postfix_str(stages[bar.n])

    bar.set_postfix_str(stages[0])
    start = time.time()
    timings = {}
    prepare_data(output, settings)
    timings["data"] = time.time() - start
    stage_done()
    foundation = prepare_foundation(output, settings)
    timings["foundation"] = time.time() - start - timings["data"]
    stage_done()
    if settings.reader_probe_steps > 0:
        if foundation:
            from .reader_probe import ProbeSettings, reader_probe_once

            probe_start = time.time()
            reader_probe_once(output, ProbeSettings(tokens="pool36", steps=settings.reader_probe_steps,
                                                    batch_size=min(32, settings.batch_size),
                                                    eval_every=max(1, settings.reader_probe_steps // 6)))
            timings["reader_probe"] = time.time() - probe_start
        stage_done()
    jobs = settings.jobs()
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, settings.workers))
    results = run_jobs(output, settings, jobs, threads_per_worker=threads, quiet=quiet)
    timings["runs"] = time.time() - start - sum(timings.values())
    stage_done()
    summary = write_report(output, settings, foundation, results, timings, export_checkpoint_to=export_checkpoint,
                           export_demo_to=export_demo)
    stage_done()
    bar.close()
    logger.info("done in %.0f s; results in %s", time.time() - start, os.path.join(output, "results.md"))
    return summary
