"""qmop vtcbench: the mini VTCBench from nothing to results (see `pipeline.py`)."""

import argparse
import logging
import sys

from qmop_tools.checks import is_square_budget
from qmop_tools.progress import library_bars

from .data import GLYPH_TARGETS, LAYOUTS, parse_dimension_weights
from .experiment import ACCEPTANCE_VARIANTS, EXPORTABLE, VARIANTS, Settings
from .pipeline import run


def parse(argv=None) -> tuple:
    """(arguments, Settings) of the command line, checked."""
    parser = argparse.ArgumentParser(
        prog="qmop vtcbench",
        description="Mini VTCBench: procedural VQA data, tiny CLIP + LLM pre-training, QMoP and its baselines trained "
        "in two stages over several seeds, accuracy per question dimension, a plot and pictures of what was kept.",
    )
    parser.add_argument("--output", default="outputs/vtcbench", help="folder for everything (resumable)")
    parser.add_argument("--smoke", action="store_true", help="a tiny version that runs in about a minute (tests)")
    parser.add_argument("--acceptance", action="store_true",
                        help="only the variants the acceptance checks read (" + ", ".join(ACCEPTANCE_VARIANTS)
                        + "), over the seeds; about 95 min from an empty folder on the two-core machine of "
                        "2026-12-06, from measured parts (docs/vtcbench.md)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="default: all")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2")
    parser.add_argument("--budget", type=int, help="visual tokens per image (perfect square; default 36)")
    parser.add_argument("--workers", type=int, help="training processes in parallel (default 2)")
    parser.add_argument("--stage2-weights", metavar="DIM=N[,DIM=N]",
                        help="times each question of a dimension is seen per stage-2 epoch, others once (default "
                        f"{Settings().stage2_weights or 'none'}); every variant gets the same schedule")
    parser.add_argument("--stage1-epochs", type=float, metavar="N",
                        help=f"stage-1 (caption) epochs of every variant (default {Settings().stage1_epochs:g}; "
                        "docs/vtcbench.md, \"Dimensions stuck at chance\")")
    parser.add_argument("--stage2-lr", type=float, metavar="LR",
                        help=f"stage-2 learning rate of every variant (default {Settings().stage2_lr:g}; at 2e-3, the "
                        "earlier default, some seeds left an answer at chance: docs/vtcbench.md, "
                        "\"Dimensions stuck at chance\")")
    parser.add_argument("--budgets-stage2-epochs", type=float, metavar="N",
                        help="stage-2 epochs of the budget-sampled variants, which see each budget a quarter of the "
                        f"time (default {Settings().budgets_stage2_epochs:g}; every other variant: "
                        f"{Settings().stage2_epochs:g})")
    parser.add_argument("--data-layout", choices=LAYOUTS,
                        help="pair (default): a decoy letter next to the tag in one pooling cell; tag: data version 6 "
                        "(docs/vtcbench.md, \"Data layout pair\")")
    parser.add_argument("--glyph-target", choices=GLYPH_TARGETS,
                        help="what the tower's per-patch glyph head names: letter (default, recipe 4) or ink (each "
                        "patch's ink pattern, so that pooling loses the letter; docs/vtcbench.md, \"Data layout pair\")")
    parser.add_argument("--export-checkpoint", metavar="DIR",
                        help="copy the best QMoP run by val accuracy of the first of "
                        f"{', '.join(EXPORTABLE)} that ran here, "
                        "with a model card, e.g. checkpoints/qmop-tiny")
    parser.add_argument("--export-demo-image", metavar="PNG",
                        help="copy a test picture the best QMoP run answers right here, with its questions (.json), "
                        "e.g. assets/demo.png")
    parser.add_argument("--fresh", action="store_true", help="delete the output folder first")
    parser.add_argument("--quiet", action="store_true", help="no progress bars; only warnings and the results table")
    args = parser.parse_args(argv)
    if args.acceptance and (args.smoke or args.variants):
        parser.error("--acceptance picks the variants itself: drop --smoke / --variants")
    settings = Settings.smoke() if args.smoke else Settings()
    if args.acceptance:
        settings.variants = list(ACCEPTANCE_VARIANTS)
    for name in ("variants", "seeds", "budget", "workers", "stage2_weights", "stage1_epochs", "stage2_lr",
                 "budgets_stage2_epochs", "data_layout", "glyph_target"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if not set(EXPORTABLE) & set(settings.variants) and (args.export_checkpoint or args.export_demo_image):
        parser.error(f"--export-checkpoint and --export-demo-image need one of the variants {', '.join(EXPORTABLE)}")
    if not is_square_budget(settings.budget) or settings.budget > 576:
        parser.error(f"--budget must be a perfect square between 1 and 576 (the 24x24 patch grid), got {settings.budget}")
    try:
        parse_dimension_weights(settings.stage2_weights)
    except ValueError as error:
        parser.error(f"--stage2-weights: {error}")
    for name in ("stage1_epochs", "stage2_lr", "budgets_stage2_epochs"):
        if not getattr(settings, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(settings, name)}")
    if settings.workers < 1 or not settings.seeds:
        parser.error("--workers must be >= 1 and --seeds must name at least one seed")
    return args, settings


def main(argv=None):
    args, settings = parse(argv)
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s", level=logging.WARNING if args.quiet else logging.INFO,
                        stream=sys.stdout)
    logging.getLogger("transformers").setLevel(logging.WARNING)
    logging.getLogger("qmop_tools.train").setLevel(logging.WARNING)
    with library_bars(quiet=args.quiet):
        summary = run(args.output, settings, fresh=args.fresh, export_checkpoint=args.export_checkpoint,
                      export_demo=args.export_demo_image, quiet=args.quiet)
    print(open(f"{args.output}/results.md").read())
    return summary


if __name__ == "__main__":
    main()
