"""Outputs of the benchmark: a Markdown report, the JSON results and a PNG plot; every file written atomically."""

import json
import os
import tempfile


def write_atomic(path: str, data, binary: bool = False) -> str:
    """Write to a temporary file beside `path`, then rename it over `path` (never a half-written file)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(handle, "wb" if binary else "w") as file:
            file.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; the result is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _fmt(value, scale=1.0, digits=1, suffix=""):
    return "n/a" if value is None else f"{value * scale:.{digits}f}{suffix}"


def _sig(value, digits=4):
    return "n/a" if value is None else f"{value:.{digits}g}"


def _ratio(value):
    return "n/a" if value is None else f"{value:.3f}x"


MAIN_COLUMNS = ["model", "visual tokens", "sequence", "prefill GFLOPs (counted)", "vs LLaVA", "analytic GFLOPs",
                "counted / analytic", "paper visual-LLM TMACs", "KV MB / sample", "KV vs LLaVA"]


def markdown_report(results: dict) -> str:
    variants = results["variants"]
    batches = results["settings"]["batch_sizes"]
    env = results["environment"]
    lines = [f"# QMoP-LLaVA vs LLaVA-1.5: prefill efficiency ({results['preset']} preset)", ""]
    lines.append(f"Device: {env['device_name']}; dtype {results['settings']['dtype']}, attention "
                 f"{results['settings']['attn_implementation']}, quantization {results['settings']['quantization'] or 'none'}; "
                 f"torch {env['torch']}, transformers {env['transformers']}, python {env['python']}; {env['date']}.")
    lines.append(f"Prompt: {results['settings']['prompt_tokens']} text tokens + the visual tokens; question "
                 f"{results['settings']['query_tokens']} CLIP tokens; {results['settings']['warmup']} warm-up + "
                 f"{results['settings']['repeats']} repeats (medians), interleaved; {results['settings']['decode_tokens']} "
                 f"decode steps. Random weights unless checkpoint paths were given.")
    lines += [f"Notes: {'; '.join(results['notes'])}.", "", "## FLOPs and KV cache (batch 1)", ""]
    lines += [_row(MAIN_COLUMNS), _row(["---"] * len(MAIN_COLUMNS))]
    base_kv = variants[0]["kv_bytes_per_sample_formula"]
    for record in variants:
        flops = record["flops"]
        kv = _measured_kv(record) or record["kv_bytes_per_sample_formula"]
        lines.append(_row([
            record["name"], record["visual_tokens"], record["sequence_length"],
            _sig(flops["counted"]["total"] / 1e9), _ratio(record["flops_vs_llava"]),
            _sig(flops["analytic"]["total"] / 1e9), f"{flops['counted_over_analytic']:.4f}",
            _sig(record['paper_visual_llm_tmacs']), _sig(kv / 1e6),
            f"{kv / base_kv:.4f} (= {record['kv_ratio_formula']})",
        ]))
    if any(r["by_batch"] for r in variants):
        lines += ["", "## Time to first token, decode speed, memory", ""]
        header = ["model"] + [f"TTFT b{b} ms (vs LLaVA)" for b in batches] + [f"decode tok/s b{b}" for b in batches]
        header += [f"peak GiB b{b}" for b in batches] + [f"max batch in {results['settings']['memory_budget_gib']} GiB"]
        lines += [_row(header), _row(["---"] * len(header))]
        for record in variants:
            cells = [record["name"]]
            for b in batches:
                e = record["by_batch"].get(str(b), {})
                cells.append(f"{_fmt(e.get('ttft_s'), 1e3)} ({_ratio(e.get('ttft_vs_llava'))})")
            cells += [_fmt(record["by_batch"].get(str(b), {}).get("decode_tokens_per_s")) for b in batches]
            cells += [_fmt(record["by_batch"].get(str(b), {}).get("peak_with_weights_bytes"), 1 / 1024**3, 2)
                      for b in batches]
            cells.append(record["max_batch_within_budget"])
            lines.append(_row(cells))
        lines += ["", f"Max batch: {variants[0]['max_batch_method']}.", ""]
        lines += _breakdown(variants, batches)
    if results.get("generate_decode"):
        lines += _generate_decode(results)
    lines += ["", "## FLOPs by component (batch 1, counted)", ""]
    parts = ["vision_tower", "text_encoder", "router", "branches", "llm"]
    lines += [_row(["model"] + parts + ["QMoP's own share"]), _row(["---"] * (len(parts) + 2))]
    for record in variants:
        counted = record["flops"]["counted"]
        own = (counted["text_encoder"] + counted["router"] + counted["branches"]) / counted["total"]
        lines.append(_row([record["name"]] + [_sig(counted[p] / 1e9) for p in parts]
                          + [f"{own:.2%}" if record["kind"] == "qmop" else "-"]))
    notes = {r["flops"]["note"] for r in variants if r["flops"]["note"]}
    if results.get("flops_ratio_basis") == "analytic":
        notes.add("quantized run: torch's FLOP counter does not see bitsandbytes' 4-bit matmuls, so the counted "
                  "column is partial and every 'vs LLaVA' FLOP ratio uses the analytic count")
    if notes:
        lines += [""] + [f"- {n}" for n in sorted(notes)]
    lines += ["", "## Targets (against LLaVA at all patches)", "", _row(["target", "value", "met"]), _row(["---"] * 3)]
    for target in results["targets"]:
        met = {True: "yes", False: "no", None: "not measured"}[target["met"]]
        lines.append(_row([target["target"], "-" if target["value"] is None else f"{target['value']:.3f}", met]))
    return "\n".join(lines) + "\n"


def _breakdown(variants, batches) -> list:
    lines = ["## QMoP prefill time by component (medians, ms)", ""]
    header = ["model", "batch", "vision tower", "text encoder", "router+branches", "LLM", "QMoP's own share"]
    lines += [_row(header), _row(["---"] * len(header))]
    for record in variants:
        for b in batches:
            e = record["by_batch"].get(str(b), {})
            if "components_s" not in e:
                continue
            c = e["components_s"]
            lines.append(_row([record["name"], b] + [_fmt(c[k], 1e3, 2) for k in
                                                       ("vision_tower", "text_encoder", "router+branches", "llm")]
                              + [f"{e['overhead_share']:.2%}"]))
    lines.append("")
    lines.append("QMoP's own share = (text encoder + router + branches) / sum of the parts; the branches include the "
                 "expert MLPs that LLaVA's projector also has.")
    return lines


def _generate_decode(results) -> list:
    backend = results["settings"].get("compile_backend", "inductor")
    lines = ["", f"## Decode in generate(): eager vs torch.compile ({backend}, fullgraph), static cache", ""]
    header = ["model", "batch", "eager tok/s", "compiled tok/s", "compiled / eager", "first compiled call s",
              "first eager call s"]
    lines += [_row(header), _row(["---"] * len(header))]
    for batch, measured in results["generate_decode"].items():
        for name, modes in measured.items():
            lines.append(_row([name, batch, _fmt(modes["eager"]["tokens_per_s"]), _fmt(modes["compiled"]["tokens_per_s"]),
                               f"{modes['speedup']:.2f}x", _fmt(modes["compiled"]["first_call_s"], digits=1),
                               _fmt(modes["eager"]["first_call_s"], digits=2)]))
    lines += ["", "Decode = from the first generated token to the last, timed by a streamer inside generate(); the "
              "first compiled call includes the compilation (prefill is eager in both modes)."]
    return lines


def _measured_kv(record):
    for entry in record["by_batch"].values():
        return entry["kv_bytes_per_sample"]
    return None


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def plot_png(results: dict) -> bytes:
    """Cost vs visual tokens: prefill FLOPs, time to first token (each batch), KV bytes; LLaVA marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qmop = sorted((r for r in results["variants"] if r["kind"] == "qmop"), key=lambda r: r["visual_tokens"])
    llava = results["variants"][0]
    tokens = [r["visual_tokens"] for r in qmop]
    panels = [("prefill GFLOPs (batch 1)", lambda r: r["flops"]["counted"]["total"] / 1e9),
              ("KV cache MB / sample", lambda r: (_measured_kv(r) or r["kv_bytes_per_sample_formula"]) / 1e6)]
    has_time = bool(llava["by_batch"])
    figure, axes = plt.subplots(1, 3 if has_time else 2, figsize=(15 if has_time else 10, 4.2))
    for axis, (title, value) in zip(axes, panels):
        axis.plot(tokens, [value(r) for r in qmop], "o-", label="QMoP-LLaVA")
        axis.plot([llava["visual_tokens"]], [value(llava)], "r*", markersize=14, label=llava["name"])
        axis.axhline(value(llava), color="r", linestyle=":", linewidth=1)
        axis.set(title=title, xlabel="visual tokens M")
    if has_time:
        axis = axes[-1]
        for batch in results["settings"]["batch_sizes"]:
            key = str(batch)
            line = axis.plot(tokens, [r["by_batch"][key]["ttft_s"] * 1e3 for r in qmop], "o-", label=f"QMoP, batch {batch}")
            axis.plot([llava["visual_tokens"]], [llava["by_batch"][key]["ttft_s"] * 1e3], "*", markersize=14,
                      color=line[0].get_color(), label=f"LLaVA, batch {batch}")
        axis.set(title="time to first token (ms)", xlabel="visual tokens M", yscale="log")
    for axis in axes:
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.suptitle(f"QMoP-LLaVA vs LLaVA-1.5 ({results['preset']} preset, {results['environment']['device_name']})",
                    fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_outputs(results: dict, output_dir: str, stem: str = "efficiency", plot: bool = True) -> dict:
    """Write `<stem>.md`, `<stem>.json` and `<stem>.png` into `output_dir`; returns their paths."""
    paths = {
        "json": write_atomic(os.path.join(output_dir, f"{stem}.json"), json.dumps(results, indent=2, default=str)),
        "markdown": write_atomic(os.path.join(output_dir, f"{stem}.md"), markdown_report(results)),
    }
    if plot:
        paths["png"] = write_atomic(os.path.join(output_dir, f"{stem}.png"), plot_png(results), binary=True)
    return paths
