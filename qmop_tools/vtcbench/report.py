"""Tables, plot and pictures of the mini VTCBench, and the export of the best QMoP run as a checkpoint."""

import io
import json
import os
import shutil
import statistics

from qmop_tools.files import atomic_folder
from qmop_tools.bench.report import write_atomic

from .data import CHANCE, DIMENSIONS
from .experiment import BUDGET_SET, BUDGET_VARIANTS, EXPORTABLE, VARIANT_LABELS, evaluate, normalise_answer

ROUTED = ("qmop", "qmop_normalized", "qmop_outcome", "qmop_outcome_greedy", "qmop_outcome_all", "vision_router",
          "vision_outcome_all", "qmop_outcome_all_std", "vision_outcome_all_std", "qmop_budgets",
          "qmop_outcome_all_budgets")
PICTURE_QUESTIONS = 6  # test questions drawn for the contact sheet
# The QMoP runs the acceptance checks and findings judge, each with what it must beat besides the single branches:
# the paper's router trained through its mixture, and the router trained by outcome through every branch.
QMOP_RUNS = {"qmop": ("uniform", "vision_router"),
             "qmop_outcome_all": ("uniform", "vision_outcome_all", "vision_router"),
             "qmop_outcome_all_std": ("uniform", "vision_outcome_all_std", "vision_outcome_all", "vision_router")}


def _qmop_name(variant: str) -> str:
    return "QMoP" if variant == "qmop" else f"QMoP ({VARIANT_LABELS[variant].split(', ', 1)[-1]})"


def _mean_std(values: list) -> tuple:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: list, split: str = "test") -> dict:
    """{variant: {"overall": (mean, std), dimension: (mean, std), "seeds": [...], "router": {...}}}"""
    by_variant = {}
    for result in results:
        by_variant.setdefault(result["variant"], []).append(result)
    table = {}
    for variant, runs in by_variant.items():
        runs = [r for r in runs if split in r["evaluation"]]
        if not runs:
            continue
        row = {"seeds": [r["seed"] for r in runs], "overall": _mean_std([r["evaluation"][split]["overall"] for r in runs])}
        for dimension in DIMENSIONS:
            row[dimension] = _mean_std([r["evaluation"][split]["per_dimension"].get(dimension, 0.0) for r in runs])
        row["seconds"] = statistics.fmean(r["seconds"] for r in runs)
        diagnostics = [r.get("router_diagnostics") for r in runs]
        if all(diagnostics):
            row["router_diagnostics"] = {
                key: _mean_std([d[key] if d[key] is not None else 0.0 for d in diagnostics])
                for key in ("question_share", "picture_share", "saturated_share", "mutual_information_bits",
                            "normalized_mutual_information", "question_flip_rate", "picture_flip_rate")
            }
            row["router_diagnostics"]["dominant_branch_per_type"] = [d["dominant_branch_per_type"] for d in diagnostics]
            row["router_diagnostics"]["dominant_branch_differs"] = [d["dominant_branch_differs"] for d in diagnostics]
        forced = [r.get("forced_branches") for r in runs]
        if split == "test" and all(forced):
            row["forced_branches"] = {
                branch: {"overall": statistics.fmean(f[branch]["overall"] for f in forced),
                         **{d: statistics.fmean(f[branch]["per_dimension"].get(d, 0.0) for f in forced) for d in DIMENSIONS}}
                for branch in forced[0]
            }
        routing = [r.get("moe_routing") for r in runs]
        if all(routing):
            row["moe_routing"] = {
                "specialisation_bits": _mean_std([m["mean_specialisation_bits"] for m in routing]),
                "cross_bin_share": _mean_std([m["mean_cross_bin_share"] for m in routing]),
                "per_layer_bits": [statistics.fmean(m["layers"][i]["specialisation_bits"] for m in routing)
                                   for i in range(len(routing[0]["layers"]))],
                "visual_share_per_bin": [[round(v, 3) for v in layer["visual_share_per_bin"]]
                                         for layer in routing[0]["layers"]],
            }
        routers = [r["evaluation"][split].get("router_weights_per_dimension") for r in runs]
        if all(routers):
            row["router"] = {
                d: {b: statistics.fmean(router[d][b] for router in routers) for b in routers[0][d]} for d in routers[0]
            }
        table[variant] = row
    return table


def markdown_table(table: dict, settings) -> str:
    order = [v for v in settings.variants if v in table]
    header = "| variant | tokens | overall | " + " | ".join(DIMENSIONS) + " | seeds | train+eval s/run |"
    lines = [header, "|" + " --- |" * (len(DIMENSIONS) + 5)]
    for variant in order:
        row = table[variant]
        tokens = 576 if variant == "full576" else settings.budget
        single = len(row["seeds"]) == 1
        cells = [f"{VARIANT_LABELS[variant]}", str(tokens), _fmt(row["overall"], single)]
        cells += [_fmt(row[d], single) for d in DIMENSIONS]
        cells += [str(len(row["seeds"])), f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    chance = statistics.fmean(CHANCE.values())
    lines.append("| chance | - | " + _pct(chance) + " | " + " | ".join(_pct(CHANCE[d]) for d in DIMENSIONS) + " | - | - |")
    return "\n".join(lines)


def router_table(table: dict) -> str:
    lines = []
    for variant in ROUTED:
        router = table.get(variant, {}).get("router")
        if not router:
            continue
        branches = list(next(iter(router.values())))
        lines.append(f"{VARIANT_LABELS[variant]}: mean router weight per question dimension (test, mean of seeds)\n")
        lines.append("| dimension | " + " | ".join(branches) + " |")
        lines.append("|" + " --- |" * (len(branches) + 1))
        for dimension in DIMENSIONS:
            if dimension in router:
                lines.append(f"| {dimension} | " + " | ".join(f"{router[dimension][b]:.2f}" for b in branches) + " |")
        lines.append("")
    return "\n".join(lines)


def router_diagnostics_table(table: dict) -> str:
    """The router diagnostic (`router_diagnostics.py`) on the test split, mean ± std over seeds, per routed variant."""
    rows = [(v, table[v]["router_diagnostics"]) for v in ROUTED if table.get(v, {}).get("router_diagnostics")]
    if not rows:
        return ""
    lines = ["Router diagnostic on test pictures x test questions (mean ± std over seeds):", "",
             "| variant | question share of logit variance | picture share | question flips the pair | "
             "picture flips the pair | MI(type; branch), bits | saturated |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for variant, d in rows:
        lines.append(f"| {VARIANT_LABELS[variant]} | " + " | ".join(
            _fmt(d[key]) for key in ("question_share", "picture_share", "question_flip_rate", "picture_flip_rate"))
            + f" | {d['mutual_information_bits'][0]:.2f} ± {d['mutual_information_bits'][1]:.2f} | "
            + _fmt(d["saturated_share"]) + " |")
    return "\n".join(lines) + "\n"


def forced_branch_oracle(row: dict) -> tuple:
    """(accuracy, {dimension: branch}) of choosing, per question type, the forced branch that answers it best inside
    this same model: what its router could reach by reading the question type alone."""
    forced = row["forced_branches"]
    best = {d: max(forced, key=lambda b: forced[b][d]) for d in DIMENSIONS}
    return statistics.fmean(forced[best[d]][d] for d in DIMENSIONS), best


def forced_branch_table(table: dict) -> str:
    """Each routed model with one branch forced for every image, next to its own router and the per-type oracle."""
    rows = [v for v in ROUTED if table.get(v, {}).get("forced_branches")]
    if not rows:
        return ""
    lines = ["Each routed model with every image sent through one branch (test %, mean of seeds): what the model's own "
             "language model reads best through each branch, against what its router chose. Oracle: per question "
             "type, the best forced branch.", "",
             "| model | routing | overall | " + " | ".join(DIMENSIONS) + " |", "|" + " --- |" * (len(DIMENSIONS) + 3)]
    for variant in rows:
        row = table[variant]
        for branch, scores in row["forced_branches"].items():
            lines.append(f"| {VARIANT_LABELS[variant]} | {branch} forced | {_pct(scores['overall'])} | "
                         + " | ".join(_pct(scores[d]) for d in DIMENSIONS) + " |")
        lines.append(f"| {VARIANT_LABELS[variant]} | **its router** | {_pct(row['overall'][0])} | "
                     + " | ".join(_pct(row[d][0]) for d in DIMENSIONS) + " |")
        oracle, best = forced_branch_oracle(row)
        lines.append(f"| {VARIANT_LABELS[variant]} | oracle by type | {_pct(oracle)} | "
                     + " | ".join(f"{_pct(row['forced_branches'][best[d]][d])} ({best[d]})" for d in DIMENSIONS) + " |")
    return "\n".join(lines) + "\n"


def moe_table(table: dict) -> str:
    """The Mixture-of-Experts LLM runs: accuracy next to how their experts split visual and text tokens."""
    rows = [v for v in table if table[v].get("moe_routing")]
    if not rows:
        return ""
    lines = ["Mixture-of-Experts LLM (the foundation LLM upcycled to 4 experts, 2 per token; bins of 2 experts): "
             "specialisation = mutual information between a token's modality and the bin of each expert it selects "
             "(bits, at most the modality entropy), cross-bin share = share of a token's second choices outside its "
             "first choice's bin (expert-parallel dispatches). On the prompts of 200 test questions, mean of seeds.",
             "", "| variant | overall | specialisation, bits (per layer) | cross-bin share, % | visual share of bin 0 / 1, seed "
             f"{table[rows[0]]['seeds'][0]} (per layer) |", "| --- | --- | --- | --- | --- |"]
    for variant in ["pooling"] * ("pooling" in table) + rows:
        row = table[variant]
        moe = row.get("moe_routing")
        if moe is None:
            lines.append(f"| {VARIANT_LABELS[variant]} (dense LLM) | {_fmt(row['overall'])} | - | - | - |")
            continue
        lines.append(f"| {VARIANT_LABELS[variant]} | {_fmt(row['overall'])} | {_fmt3(moe['specialisation_bits'])} ("
                     + ", ".join(f"{b:.3f}" for b in moe["per_layer_bits"]) + f") | {_fmt(moe['cross_bin_share'])} | "
                     + "; ".join(" / ".join(f"{v:.2f}" for v in layer) for layer in moe["visual_share_per_bin"]) + " |")
    return "\n".join(lines) + "\n"


def _fmt3(mean_std) -> str:
    return f"{mean_std[0]:.3f} ± {mean_std[1]:.3f}"


def foundation_line(foundation: dict) -> str:
    clip = foundation["clip"]
    heads = clip.get("val_head_accuracy", {})
    return (
        "Foundation (frozen, shared by every variant): tower heads on val patches, accuracy (balanced: mean of "
        "per-class recalls) "
        + ", ".join(f"{k.split('/')[1]} {100 * v:.0f}%" + (f" ({100 * heads[k + '/balanced']:.0f}%)"
                                                          if k + "/balanced" in heads else "")
                    for k, v in heads.items() if k.startswith("patch/") and not k.endswith("/balanced"))
        + f"; salience pruning keeps {100 * clip['salience_pruning']['tag_patches_kept']:.0f}% of tag patches and "
        f"{100 * clip['salience_pruning']['foreground_patches_kept']:.0f}% of foreground patches at "
        f"{clip['salience_pruning']['budget']} tokens; text encoder caption retrieval top-1 "
        f"{100 * clip['val_caption_retrieval_top1']:.0f}% (chance {100 * clip['val_caption_retrieval_chance']:.0f}%); "
        f"LLM text loss {foundation['llm']['first_loss']:.2f} -> {foundation['llm']['last_loss']:.2f}."
    )


def reader_probe_table(output: str) -> str:
    """The reader probes found in `<output>/probes/` (`reader_probe.py`): val accuracy per dimension at their last
    step, next to chance. Empty when none was run."""
    rows = []
    for name in sorted(os.listdir(os.path.join(output, "probes"))) if os.path.isdir(os.path.join(output, "probes")) else []:
        with open(os.path.join(output, "probes", name)) as f:
            probe = json.load(f)
        last, settings = probe["curve"][-1], probe["settings"]
        cells = [f"{last['val_accuracy'][d]:.1f}" if d in last["val_accuracy"] else "-" for d in DIMENSIONS]
        trained_on = settings.get("dimensions") or "all"
        if settings.get("weights"):
            trained_on += f", weighted {settings['weights']}"
        if settings.get("seed"):
            trained_on += f", seed {settings['seed']}"
        rows.append(f"| {settings['tokens']} ({probe['tokens_per_picture']} tokens) | {trained_on} "
                    f"| {settings['lr']:g} | {last['step']} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    header = ["Reader probe (projector + LLM trained on the frozen tower's tokens for the answer token alone; val "
              "accuracy in %; an upper bound on what a variant can read):", "",
              "| tokens | trained on | lr | steps | " + " | ".join(DIMENSIONS) + " |",
              "|" + " --- |" * (len(DIMENSIONS) + 4),
              "| chance | | | | " + " | ".join(f"{100 * CHANCE[d]:.1f}" for d in DIMENSIONS) + " |"]
    return "\n".join(header + rows) + "\n"


def _fmt(mean_std, single_seed: bool = False) -> str:
    mean, std = mean_std
    return f"{100 * mean:.1f}" if single_seed else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def findings(table: dict) -> list:
    """Plain statements of what the table says about the paper's claims (computed, not written by hand)."""
    out = []
    singles = {v: table[v]["overall"] for v in ("pooling", "resampler", "pruning") if v in table}
    for variant, comparators in QMOP_RUNS.items():
        if variant not in table:
            continue
        q, name = table[variant]["overall"], _qmop_name(variant)
        if singles:
            best = max(singles, key=lambda v: singles[v][0])
            out.append(_compare(name, q, f"the best single branch ({best})", singles[best]))
        for other in comparators + ("random_k", "downsample", "full576"):
            if other in table:
                out.append(_compare(name, q, VARIANT_LABELS[other], table[other]["overall"]))
    if singles and "qmop" in table:
        best = max(singles, key=lambda v: singles[v][0])
        for variant in ("qmop_normalized", "qmop_outcome", "qmop_outcome_greedy"):
            if variant in table:
                out.append(_compare(VARIANT_LABELS[variant], table[variant]["overall"],
                                    f"the best single branch ({best})", singles[best]))
    # The accuracy cost of each method beyond the projector, against the same model without it.
    for variant, reference in (("qg_vtc", "pooling"), ("llm_pruning", "pooling"), ("learned_pruner", "pruning")):
        if variant in table and reference in table:
            out.append(_compare(VARIANT_LABELS[variant], table[variant]["overall"], VARIANT_LABELS[reference],
                                table[reference]["overall"]))
    best_per_dimension = {}
    for dimension in DIMENSIONS:
        rows = {v: table[v][dimension][0] for v in ("pooling", "resampler", "pruning") if v in table}
        if len(rows) == 3:
            best = max(rows, key=rows.get)
            best_per_dimension[dimension] = (best, rows[best])
            out.append(f"{dimension}: best single branch is {best} ({100 * rows[best]:.1f}%)")
    if len(best_per_dimension) == len(DIMENSIONS):
        # What QMoP's claim can reach here: a router choosing by question type among models each trained on one
        # branch (dimensions have equal question counts, so overall is their mean).
        ceiling = sum(score for _, score in best_per_dimension.values()) / len(DIMENSIONS)
        out.append(f"the best single branch per question type, averaged: {100 * ceiling:.1f} (a router that only "
                   f"knew the question type could reach this with the single-branch models; QMoP "
                   f"{100 * q[0]:.1f})")
    for variant in ROUTED:
        row = table.get(variant, {})
        if row.get("forced_branches"):
            oracle, best = forced_branch_oracle(row)
            forced_best = max(row["forced_branches"], key=lambda b: row["forced_branches"][b]["overall"])
            out.append(f"{VARIANT_LABELS[variant]}: its router {100 * row['overall'][0]:.1f}, its best branch forced "
                       f"for every image ({forced_best}) {100 * row['forced_branches'][forced_best]['overall']:.1f}, "
                       f"its best branch per question type {100 * oracle:.1f} ("
                       + ", ".join(f"{d} {b}" for d, b in best.items()) + ")")
    return out


def acceptance(table: dict) -> list:
    """The issue's acceptance checks, each as (check, met, the numbers behind it). Missing rows give no line."""
    checks = []
    if "full576" in table:
        low = {d: table["full576"][d][0] - CHANCE[d] for d in DIMENSIONS}
        worst = min(low, key=low.get)
        checks.append(("576 tokens >= chance + 30 points on every dimension", all(v >= 0.30 for v in low.values()),
                       "margins over chance: " + ", ".join(f"{d} {100 * v:+.1f}" for d, v in low.items())
                       + f" (lowest: {worst})"))
    if "pooling" in table and "pruning" in table:
        gap = table["pruning"]["local"][0] - table["pooling"]["local"][0]
        checks.append(("pruning beats pooling on local by >= 10 points", gap >= 0.10,
                       f"pruning {100 * table['pruning']['local'][0]:.1f} vs pooling {100 * table['pooling']['local'][0]:.1f}"))
        diff = table["pooling"]["global"][0] - table["pruning"]["global"][0]
        checks.append(("pooling >= pruning on global", diff >= 0,
                       f"pooling {100 * table['pooling']['global'][0]:.1f} vs pruning {100 * table['pruning']['global'][0]:.1f}"))
    for variant, comparators in QMOP_RUNS.items():
        if variant not in table:
            continue
        q, name = table[variant]["overall"], _qmop_name(variant)
        singles = {v: table[v]["overall"] for v in ("pooling", "resampler", "pruning") if v in table}
        if singles:
            best = max(singles, key=lambda v: singles[v][0])
            checks.append((f"{name} >= the best single branch ({best}) overall", q[0] >= singles[best][0],
                           f"{100 * q[0]:.1f} ± {100 * q[1]:.1f} vs {100 * singles[best][0]:.1f} ± {100 * singles[best][1]:.1f}"))
        for other in comparators:
            if other in table:
                o = table[other]["overall"]
                noise = max(q[1], o[1])
                checks.append((f"{name} above {VARIANT_LABELS[other]} by more than the larger std", q[0] - o[0] > noise,
                               f"{100 * q[0]:.1f} ± {100 * q[1]:.1f} vs {100 * o[0]:.1f} ± {100 * o[1]:.1f}"))
        diag = table[variant].get("router_diagnostics")
        if diag:
            share = diag["question_share"]
            checks.append((f"{name}: the question explains >= 50% of router-logit variance", share[0] >= 0.5,
                           f"{100 * share[0]:.1f}% ± {100 * share[1]:.1f} (picture {100 * diag['picture_share'][0]:.1f}%)"))
            differs = diag["dominant_branch_differs"]
            checks.append((f"{name}: the dominant branch differs between question types", all(differs),
                           f"{sum(differs)} of {len(differs)} runs; dominant branch per type: "
                           + "; ".join(", ".join(f"{t} {b}" for t, b in sorted(run.items()))
                                       for run in diag["dominant_branch_per_type"])))
            saturated = diag["saturated_share"]
            checks.append((f"{name}: < 50% of eval samples saturated", saturated[0] < 0.5,
                           f"{100 * saturated[0]:.1f}% ± {100 * saturated[1]:.1f} with top probability > 0.99"))
    return checks


def acceptance_markdown(checks: list) -> str:
    lines = ["| check | met | numbers |", "| --- | --- | --- |"]
    lines += [f"| {check} | {'yes' if met else '**no**'} | {numbers} |" for check, met, numbers in checks]
    return "\n".join(lines)


def budget_table(results: list) -> str:
    """The budget-sampled QMoP at each budget, next to fixed-budget QMoP runs where there are any (test split)."""
    runs = [r for r in results if r["variant"] in BUDGET_VARIANTS]
    if not runs:
        return ""
    lines = ["| model | budget | overall | " + " | ".join(DIMENSIONS) + " |", "|" + " --- |" * (len(DIMENSIONS) + 3)]
    for budget in BUDGET_SET:
        for r in runs:
            key = "test" if f"test@{budget}" not in r["evaluation"] else f"test@{budget}"
            if key == "test" and r["settings"]["num_visual_tokens"] != budget:
                continue
            e = r["evaluation"][key]
            lines.append(f"| {VARIANT_LABELS[r['variant']]} (seed {r['seed']}) | {budget} | "
                         f"{100 * e['overall']:.1f} | " + " | ".join(f"{100 * e['per_dimension'][d]:.1f}" for d in DIMENSIONS)
                         + " |")
        fixed = [r for r in results if r["variant"] == "qmop" and r["settings"]["num_visual_tokens"] == budget]
        if fixed:
            e = [r["evaluation"]["test"] for r in fixed]
            lines.append(f"| QMoP trained at {budget} only ({len(fixed)} seeds, mean) | {budget} | "
                         f"{100 * statistics.fmean(x['overall'] for x in e):.1f} | "
                         + " | ".join(f"{100 * statistics.fmean(x['per_dimension'][d] for x in e):.1f}" for d in DIMENSIONS)
                         + " |")
    return "\n".join(lines)


def _compare(name_a, a, name_b, b) -> str:
    diff = a[0] - b[0]
    noise = max(a[1], b[1])
    if noise == 0:  # one seed on each side: no error bar to compare with
        verdict = "one seed, no error bar"
    else:
        verdict = ("within one std (not distinguishable)" if abs(diff) <= noise
                   else ("higher" if diff > 0 else "lower") + " by more than one std")
    return (f"{name_a} {100 * a[0]:.1f} ± {100 * a[1]:.1f} vs {name_b} {100 * b[0]:.1f} ± {100 * b[1]:.1f}: "
            f"{diff * 100:+.1f} points, {verdict}")


def plot(table: dict, settings, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [v for v in settings.variants if v in table]
    groups = ["overall", *DIMENSIONS]
    width = 0.8 / max(1, len(order))
    rows = (len(order) + 2) // 3  # legend rows, below the axes
    fig, ax = plt.subplots(figsize=(11, 4.2 + 0.22 * rows))
    colours = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")  # a colour per variant
    for i, variant in enumerate(order):
        means = [100 * table[variant][g][0] for g in groups]
        stds = [100 * table[variant][g][1] for g in groups]
        positions = [g + (i - (len(order) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(positions, means, width, yerr=stds, capsize=2, label=VARIANT_LABELS[variant], color=colours(i))
    for g, group in enumerate(groups):
        chance = statistics.fmean(CHANCE.values()) if group == "overall" else CHANCE[group]
        ax.hlines(100 * chance, g - 0.45, g + 0.45, colors="black", linestyles="dotted", linewidth=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Mini VTCBench: {settings.budget} visual tokens of 576 (dotted: chance)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # long labels: the legend is not cut off
    plt.close(fig)
    write_atomic(path, buffer.getvalue(), binary=True)


def best_qmop_run(results: list):
    """The run exported as the bundled checkpoint: of the first variant in `EXPORTABLE` that ran (the outcome-trained
    router with sampled budgets, then the mixture one with sampled budgets, then fixed-budget QMoP), the seed with
    the best validation accuracy."""
    for variant in EXPORTABLE:
        runs = [r for r in results if r["variant"] == variant and "val" in r["evaluation"]]
        if runs:
            return max(runs, key=lambda r: (r["evaluation"]["val"]["overall"], -r["seed"]))
    return None


def draw_pictures(output: str, model_dir: str, data_dir: str) -> list:
    """Analysis pictures for the first test image's questions (one per dimension), and a contact sheet."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .visualize import analyse, contact_sheet, render_analysis, save_png

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    with open(os.path.join(data_dir, "test_vqa.json")) as f:
        samples = json.load(f)
    chosen = samples[:5] + [s for s in samples[5:] if s["dimension"] == "local"][:1]
    pictures_dir = os.path.join(output, "pictures")
    pictures, paths = [], []
    for sample in chosen[:PICTURE_QUESTIONS]:
        image = Image.open(os.path.join(data_dir, "images", sample["image"])).convert("RGB")
        question = sample["conversations"][0]["value"].replace("<image>", "").strip()
        result = analyse(model, processor, image, question)
        picture = render_analysis(result, expected=sample["conversations"][1]["value"])
        path = save_png(picture, os.path.join(pictures_dir, f"{sample['id']}.png"))
        pictures.append(picture)
        paths.append(path)
    sheet = save_png(contact_sheet(pictures, columns=2), os.path.join(output, "pictures.png"))
    return [sheet, *paths]


def export_checkpoint(model_dir: str, target: str, card: str, results: dict) -> str:
    """Copy the model folder to `target` with a model card and the results it was chosen by (atomic)."""
    with atomic_folder(target) as tmp:
        for name in os.listdir(model_dir):
            source = os.path.join(model_dir, name)
            if name in ("training_args.bin", "trainer_state.json", "all_results.json", "train_results.json"):
                continue
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(tmp, name))
            else:
                shutil.copy2(source, os.path.join(tmp, name))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
        with open(os.path.join(tmp, "vtcbench_results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return os.path.abspath(target)


def exported_layout(checkpoint_dir: str) -> str:
    """The data layout an exported checkpoint was trained and measured on (its `vtcbench_results.json`); exports from
    before layouts existed were trained on "tag"."""
    with open(os.path.join(checkpoint_dir, "vtcbench_results.json")) as f:
        return json.load(f)["settings"].get("data_layout", "tag")


SLICE_IMAGES = 40  # the fixed test slice of the accuracy test: the first 40 test images, 200 questions


def write_report(output: str, settings, foundation: dict, results: list, timings: dict, export_checkpoint_to=None,
                 export_demo_to=None) -> dict:
    table = aggregate(results)
    best = best_qmop_run(results)
    data_dir = os.path.join(output, "data")
    summary = {
        "settings": settings.__dict__,
        "foundation": foundation,
        "timings_seconds": {k: round(v, 1) for k, v in timings.items()},
        "table": table,
        "findings": findings(table),
        "acceptance": [{"check": c, "met": m, "numbers": n} for c, m, n in acceptance(table)],
        "best_qmop": None if best is None else {"variant": best["variant"], "seed": best["seed"],
                                                  "per_dimension": best["evaluation"]["test"]["per_dimension"],
                                                  "stage2_epochs": best["job_key"]["stage2_epochs"],
                                                  "val": best["evaluation"]["val"]["overall"],
                                                  "test": best["evaluation"]["test"]["overall"]},
        "runs": results,
    }
    plot_path = os.path.join(output, "results.png")
    plot(table, settings, plot_path)
    pictures = []
    if best is not None:
        model_dir = os.path.join(output, "runs", f"{best['variant']}-s{best['seed']}", "model")
        pictures = draw_pictures(output, model_dir, data_dir)
        slice_eval = evaluate(model_dir, data_dir, "test", limit=SLICE_IMAGES * len(DIMENSIONS))
        summary["best_qmop"]["test_slice"] = slice_eval["overall"]
        summary["best_qmop"]["test_slice_questions"] = slice_eval["count"]
    md = [
        f"# Mini VTCBench results ({settings.budget} visual tokens of 576)",
        "",
        markdown_table(table, settings),
        "",
        "Test accuracy in % (exact match of the first word of the greedy answer), mean ± sample std over seeds "
        f"{settings.seeds} (the budget-sampled QMoP: seeds {settings.budgets_seeds}); {settings.test_images} test "
        f"images x 5 questions = {settings.test_images * 5} questions ({settings.test_images} per dimension). "
        "Chance: a uniform guess among the answers each question allows.",
        "",
        "## Acceptance checks",
        "",
        acceptance_markdown(acceptance(table)),
        "",
        "## What it says",
        "",
        *[f"- {line}" for line in summary["findings"]],
        "",
        router_table(table),
        router_diagnostics_table(table),
        "",
        forced_branch_table(table),
        "",
        budget_table(results),
        "",
        moe_table(table),
        "",
        foundation_line(foundation),
        "",
        reader_probe_table(output),
        "Wall time of this invocation (s; finished runs are reused, not re-timed): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".",
    ]
    if best is not None:
        md += ["", f"Best QMoP run by val accuracy: {VARIANT_LABELS[best['variant']]}, seed {best['seed']} (val {100 * best['evaluation']['val']['overall']:.1f}%, "
               f"test {100 * best['evaluation']['test']['overall']:.1f}%, test slice of {summary['best_qmop']['test_slice_questions'] // 5} images "
               f"{100 * summary['best_qmop']['test_slice']:.1f}%)."]
    write_atomic(os.path.join(output, "results.md"), "\n".join(md) + "\n")
    write_atomic(os.path.join(output, "results.json"), json.dumps(summary, indent=1))
    slim = {k: v for k, v in summary.items() if k != "runs"}
    if best is not None and export_checkpoint_to:
        card = model_card(settings, table, summary, md)
        export_checkpoint(os.path.join(output, "runs", f"{best['variant']}-s{best['seed']}", "model"), export_checkpoint_to, card,
                          {"best_qmop": summary["best_qmop"], "table": table, "settings": settings.__dict__})
    if best is not None and export_demo_to:
        slim["demo"] = export_demo_image(output, f"{best['variant']}-s{best['seed']}", export_demo_to)
    slim["pictures"] = pictures
    slim["plot"] = plot_path
    return slim


def model_card(settings, table, summary, md_lines) -> str:
    best = summary["best_qmop"]
    return "\n".join([
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [qmop-llava, llava, token-compression, tiny, synthetic]",
        "---",
        "",
        "# qmop-tiny: a QMoP-LLaVA trained on the mini VTCBench",
        "",
        f"A tiny QMoP-LLaVA ({settings.budget} visual tokens of 576, three branches, query-guided router) trained in two "
        "stages on procedurally generated pictures (`qmop vtcbench`), to answer short questions "
        "about such pictures: background colour, the letter on the tag, which half the cross is in, how many "
        "shapes there are, background texture. It knows nothing else. Test accuracy per dimension: "
        + ", ".join(f"{d} {100 * v:.1f}% (chance {100 * CHANCE[d]:.1f}%)" for d, v in best["per_dimension"].items())
        + ": compare with chance before trusting an answer.",
        "",
        f"Chosen as the exported QMoP run (budget-sampled if there is one, then best by validation accuracy): "
        f"{VARIANT_LABELS[best['variant']]} "
        f"({best['stage2_epochs']:g} epochs of stage 2), seed {best['seed']}, val "
        f"{100 * best['val']:.1f}%, test {100 * best['test']:.1f}%, test slice (first {best['test_slice_questions'] // 5} test images) "
        f"{100 * best['test_slice']:.1f}%.",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        'model = AutoModelForImageTextToText.from_pretrained("checkpoints/qmop-tiny", trust_remote_code=True)',
        'processor = AutoProcessor.from_pretrained("checkpoints/qmop-tiny", trust_remote_code=True)',
        "```",
        "",
        *(line for line in md_lines if not line.startswith("Wall time")),  # a card does not change with re-runs
        "",
    ])


def export_demo_image(output: str, run_name: str, target_png: str) -> dict:
    """Copy to `target_png` the first test picture on which the chosen QMoP run answered the most questions right,
    and write next to it (`.json`) its questions, the generator's answers, the run's own answers and which were right.
    The choice is recorded in the JSON: the demo shows a picture the model does well on, the table says how often
    that happens."""
    data_dir = os.path.join(output, "data")
    with open(os.path.join(output, "runs", run_name, "predictions.json")) as f:
        predictions = json.load(f)
    by_image = {}
    for p in predictions:
        by_image.setdefault(p["id"].rsplit("-", 1)[0], []).append(p)
    ranked = sorted(by_image.items(), key=lambda item: (-sum(p["correct"] for p in item[1]), int(item[0].split("-")[1])))
    image_id, questions = ranked[0]
    split, index = image_id.split("-")
    source = os.path.join(data_dir, "images", split, f"{int(index):05d}.png")
    spec = {
        "image": os.path.basename(target_png),
        "source": f"mini VTCBench {split} split, image {int(index)} (data seed 0), never trained on",
        "chosen_because": f"first {split} picture on which {run_name} answered "
                          f"{sum(p['correct'] for p in questions)} of {len(questions)} questions right",
        "questions": [p["question"] for p in questions],
        "answers": [p["answer"] for p in questions],
        "model_answers": [normalise_answer(p["prediction"]) for p in questions],
        "correct": [bool(p["correct"]) for p in questions],
        "dimensions": [p["dimension"] for p in questions],
    }
    with open(source, "rb") as f:
        write_atomic(target_png, f.read(), binary=True)
    write_atomic(os.path.splitext(target_png)[0] + ".json", json.dumps(spec, indent=1))
    return spec
