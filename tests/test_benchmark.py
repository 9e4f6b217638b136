"""Efficiency benchmark (qmop_tools.bench): the smoke preset end to end through the CLI, exact KV ratios, FLOP
counts that the analytic formula explains to the FLOP, the paper's Table 6 arithmetic, 7B shapes on meta."""

import json
import os
from fractions import Fraction

import pytest
import torch

from qmop_tools.bench import flops as F
from qmop_tools.bench.cli import main
from qmop_tools.bench.measure import kv_bytes_formula
from qmop_tools.bench.models import build_qmop, get_preset
from qmop_tools.bench.report import write_atomic
from qmop_tools.bench.runner import BenchSettings, run_benchmark
from transformers import LlamaConfig

SMOKE_ARGS = ["--preset", "smoke", "--batch-sizes", "1", "2", "--warmup", "0", "--repeats", "1", "--decode-tokens", "2"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench")
    main(SMOKE_ARGS + ["--output", str(output)])
    with open(output / "efficiency.json") as file:
        return json.load(file), output


def test_cli_writes_markdown_json_and_png(smoke_run):
    results, output = smoke_run
    assert sorted(os.listdir(output)) == ["efficiency.json", "efficiency.md", "efficiency.png"]  # no temp files left
    with open(output / "efficiency.png", "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    markdown = (output / "efficiency.md").read_text()
    names = [v["name"] for v in results["variants"]]
    assert names == ["LLaVA-1.5 (64)", "QMoP M=64", "QMoP M=16", "QMoP M=4"]
    for section in ("## FLOPs and KV cache", "## Time to first token", "## QMoP prefill time by component",
                    "## FLOPs by component", "## Targets"):
        assert section in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = table[0].split(" | ")
    assert "prefill GFLOPs (counted)" in table[0] and "KV vs LLaVA" in table[0]
    first_table = table[2:2 + len(names)]
    assert [row.split(" | ")[0].lstrip("| ") for row in first_table] == names
    assert all(len(row.split(" | ")) == len(header) for row in first_table)


def test_kv_cache_bytes_are_exactly_the_token_ratio(smoke_run):
    results, _ = smoke_run
    prompt = results["settings"]["prompt_tokens"]
    baseline = results["variants"][0]
    assert baseline["visual_tokens"] == 64
    base_kv = baseline["by_batch"]["1"]["kv_bytes_per_sample"]
    for record in results["variants"]:
        m = record["visual_tokens"]
        for batch in ("1", "2"):  # measured from the real cache after prefill, per sample
            kv = record["by_batch"][batch]["kv_bytes_per_sample"]
            assert kv == record["kv_bytes_per_sample_formula"]
            assert Fraction(kv, base_kv) == Fraction(prompt + m, prompt + 64)
        assert record["kv_ratio_exact"] is True
        assert record["kv_ratio_measured"] == record["kv_ratio_formula"]
    assert results["targets"][-1]["met"] is True


def test_counted_flops_equal_the_analytic_count(smoke_run):
    results, _ = smoke_run
    for record in results["variants"]:
        flops = record["flops"]
        counted, analytic = dict(flops["counted"]), dict(flops["analytic"])
        # transformers 4.57's Llama rotary embedding computes its angles with a tiny matmul (head_dim/2 x n MACs);
        # 5.x does not. Everything else matches the formula to the FLOP.
        assert counted.pop("llm") == pytest.approx(analytic.pop("llm"), rel=2e-4), record["name"]
        counted.pop("total"), analytic.pop("total")
        assert counted == analytic, record["name"]
        assert flops["whole_forward"] == flops["counted"]["total"]  # the parts add up to the real forward
    qmop = [r for r in results["variants"] if r["kind"] == "qmop"]
    assert all(sum(r["flops"]["branch_images"].values()) == 2 for r in qmop)  # top-2 router, one image
    totals = [r["flops"]["counted"]["total"] for r in qmop]
    assert totals == sorted(totals, reverse=True)  # fewer visual tokens, fewer FLOPs


def test_timings_memory_and_overhead_are_reported(smoke_run):
    results, _ = smoke_run
    for record in results["variants"]:
        for batch in ("1", "2"):
            entry = record["by_batch"][batch]
            assert entry["ttft_s"] > 0 and entry["decode_tokens_per_s"] > 0
            assert entry["peak_bytes"] is None  # CPU: not measured, and said so
            if record["kind"] == "qmop":
                assert set(entry["components_s"]) == {"vision_tower", "text_encoder", "router+branches", "llm"}
                assert 0 < entry["overhead_share"] < 1
        assert record["max_batch_within_budget"] >= 1
    assert results["variants"][0]["by_batch"]["1"]["ttft_vs_llava"] == 1.0


def test_paper_table6_arithmetic():
    vicuna = LlamaConfig(**get_preset("7b").shapes.llm)
    assert round(F.paper_visual_llm_macs(vicuna, 144) / 1e12, 3) == 0.938
    assert round(F.paper_visual_llm_macs(vicuna, 576) / 1e12, 3) == 3.817
    assert kv_bytes_formula(vicuna, 144, 2) == 75_497_472  # 75.5 MB in fp16
    assert round(kv_bytes_formula(vicuna, 576, 2) / 1e6, 1) == 302.0


def test_7b_shapes_on_meta_count_flops_without_weights():
    settings = BenchSettings(preset="7b", device="meta", budgets=[576, 144, 64])
    results = run_benchmark(settings, log=lambda *_: None)
    by_m = {r["visual_tokens"]: r for r in results["variants"] if r["kind"] == "qmop"}
    for record in results["variants"]:
        assert record["flops"]["counted_over_analytic"] == pytest.approx(1.0, rel=1e-5)
        assert record["by_batch"] == {}  # nothing can be timed on meta
    # With the router's two costliest branches (an upper bound), the FLOP targets hold at 7B shapes.
    assert by_m[144]["flops_vs_llava"] <= 0.33 and by_m[64]["flops_vs_llava"] <= 0.21
    assert by_m[144]["kv_ratio_formula"] == "23/77"  # (40 + 144) / (40 + 576)


def test_meta_build_materialises_nothing():
    model = build_qmop(get_preset("7b").shapes, device="meta", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) > 7e9


def test_bad_settings_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("13b")
    with pytest.raises(ValueError, match="perfect square"):
        run_benchmark(BenchSettings(preset="smoke", budgets=[10]), log=lambda *_: None)
    with pytest.raises(ValueError, match="nf4 needs materialised weights"):
        run_benchmark(BenchSettings(preset="smoke", device="meta", quantization="nf4"), log=lambda *_: None)
    with pytest.raises(SystemExit):
        main(["--preset", "smoke", "--quantization", "int3"])


def test_write_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "out" / "report.md"
    write_atomic(str(path), "first")
    write_atomic(str(path), "second")
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["report.md"]


def _fake_results(peaks: bool) -> dict:
    """Results as a CUDA run would leave them (no GPU needed to check the arithmetic on top of them)."""
    def record(kind, tokens, flops, ttft, overhead=None):
        by_batch = {}
        for batch in (1, 8):
            entry = dict(ttft_s=ttft * batch, kv_bytes_per_sample=(40 + tokens) * 1000,
                         peak_bytes=(batch * 100 + 50) * 2**20 if peaks else None)
            if overhead is not None:
                entry["overhead_share"] = overhead
            by_batch[str(batch)] = entry
        return dict(name=f"{kind} {tokens}", kind=kind, visual_tokens=tokens, sequence_length=40 + tokens,
                    kv_bytes_per_sample_formula=(40 + tokens) * 1000, by_batch=by_batch,
                    flops={"counted": {"total": flops}})

    variants = [record("llava", 576, 100.0, 1.0), record("qmop", 144, 30.0, 0.3, 0.04), record("qmop", 64, 25.0, 0.5, 0.04)]
    return dict(settings=dict(decode_tokens=8), weights_bytes={"llava": 2**30, "qmop": 2**30}, variants=variants)


def test_memory_fit_uses_measured_peaks_when_there_are_some():
    from qmop_tools.bench.runner import _add_memory_fit

    results = _fake_results(peaks=True)
    _add_memory_fit(results, budget_bytes=2 * 2**30)  # 1 GiB left after the weights, 100 MiB a sample, 50 MiB fixed
    assert results["variants"][0]["max_batch_within_budget"] == (1024 - 50) // 100
    assert "measured peak" in results["variants"][0]["max_batch_method"]
    assert results["variants"][0]["by_batch"]["8"]["peak_with_weights_bytes"] == 2**30 + 850 * 2**20

    results = _fake_results(peaks=False)
    _add_memory_fit(results, budget_bytes=2 * 2**30)
    kv_at_end = 1000 * (616 + 9)  # KV formula per sample at prompt + visual + decode tokens
    assert results["variants"][0]["max_batch_within_budget"] == 2**30 // kv_at_end
    assert "upper bound" in results["variants"][0]["max_batch_method"]


def test_targets_are_read_at_the_right_budget_and_batch():
    from qmop_tools.bench.runner import _add_ratios, evaluate_targets

    results = _fake_results(peaks=True)
    _add_ratios(results)
    targets = {t["target"].split(" <=")[0]: t for t in evaluate_targets(results)}
    assert targets["prefill FLOPs at M=144"]["value"] == pytest.approx(0.30) and targets["prefill FLOPs at M=144"]["met"]
    assert targets["prefill FLOPs at M=64"]["value"] == pytest.approx(0.25) and not targets["prefill FLOPs at M=64"]["met"]
    assert targets["TTFT at M=144, batch 8"]["value"] == pytest.approx(0.30)
    assert targets["QMoP's own overhead"]["value"] == pytest.approx(0.04) and targets["QMoP's own overhead"]["met"]


def test_nf4_quantizes_only_the_llm_layers_and_runs(monkeypatch):
    """Random weights go through save -> 4-bit load; bitsandbytes' CPU kernels need widths that are multiples of 64."""
    pytest.importorskip("bitsandbytes")
    from qmop_tools.bench import models

    def nf4_smoke():
        preset = models.get_preset("smoke")
        preset.shapes.llm.update(hidden_size=64, intermediate_size=128, num_key_value_heads=4)
        return preset

    monkeypatch.setitem(models.PRESETS, "smoke-nf4", nf4_smoke)
    qmop = models.build_qmop(nf4_smoke().shapes, device="cpu", dtype=torch.float32, quantization="nf4")
    quantized = {name for name, module in qmop.named_modules() if type(module).__name__ == "Linear4bit"}
    assert quantized and all(".language_model.layers." in name for name in quantized)
    settings = BenchSettings(preset="smoke-nf4", quantization="nf4", budgets=[64, 16], batch_sizes=[1], warmup=0,
                             repeats=1, decode_tokens=1, components=False)
    results = run_benchmark(settings, log=lambda *_: None)
    assert results["flops_ratio_basis"] == "analytic"
    assert results["variants"][2]["flops_vs_llava"] < 1
    assert results["variants"][2]["kv_ratio_exact"] is True


def test_cpu_preset_on_the_576_patch_grid(tmp_path):
    """The CPU preset itself (cut to one short run): the issue's exact KV ratio (T+M)/(T+576) at M=144."""
    main(["--preset", "cpu", "--budgets", "144", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1",
          "--decode-tokens", "1", "--no-components", "--no-plot", "--compile-batch-sizes", "--output", str(tmp_path)])
    results = json.loads((tmp_path / "efficiency.json").read_text())
    llava, qmop = results["variants"]
    assert (llava["visual_tokens"], qmop["visual_tokens"], results["settings"]["prompt_tokens"]) == (576, 144, 40)
    ratio = Fraction(qmop["by_batch"]["1"]["kv_bytes_per_sample"], llava["by_batch"]["1"]["kv_bytes_per_sample"])
    assert ratio == Fraction(40 + 144, 40 + 576)
    assert qmop["flops"]["whole_forward"] == qmop["flops"]["counted"]["total"]
    assert "| QMoP M=144 | 144 | 184 |" in (tmp_path / "efficiency.md").read_text()


def test_generate_decode_eager_vs_compiled(tmp_path):
    """The generate() decode comparison (dynamo's "eager" backend keeps it quick): LLaVA and QMoP at M = P/4, both
    modes timed, the compiled one really compiled, and the table in the report."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    main(["--preset", "smoke", "--budgets", "64", "16", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1",
          "--decode-tokens", "3", "--no-components", "--no-plot", "--compile-batch-sizes", "1", "--compile-backend",
          "eager", "--output", str(tmp_path)])
    assert counters["stats"]["unique_graphs"] >= 2  # one decode graph per model at least
    results = json.loads((tmp_path / "efficiency.json").read_text())
    measured = results["generate_decode"]["1"]
    assert list(measured) == ["LLaVA-1.5 (64)", "QMoP M=16"]
    for modes in measured.values():
        assert modes["eager"]["tokens_per_s"] > 0 and modes["compiled"]["tokens_per_s"] > 0
        assert len(modes["compiled"]["all"]) == 1 and modes["compiled"]["first_call_s"] > 0
    markdown = (tmp_path / "efficiency.md").read_text()
    assert "## Decode in generate(): eager vs torch.compile (eager, fullgraph), static cache" in markdown
    assert "| QMoP M=16 | 1 |" in markdown


def test_dense_projector_flops_follow_every_branch(monkeypatch):
    """On an accelerator at small batch the projector runs every branch on every image (the dense path): the FLOP
    count then charges all of them, and the analytic count, told so, agrees."""
    from modeling_qmop import QMoPProjector
    from qmop_tools.bench.measure import adapter_for, count_prefill_flops
    from qmop_tools.bench.models import make_inputs

    preset = get_preset("smoke")
    model = build_qmop(preset.shapes, device="cpu", dtype=torch.float32)
    monkeypatch.setattr(QMoPProjector, "uses_dense_path", lambda self, num_images, device: True)
    inputs = make_inputs(model.config, 1, preset.prompt_tokens, 16, preset.query_tokens, "cpu", torch.float32)
    counted = count_prefill_flops(adapter_for(model), inputs)
    assert counted["branch_images"] == {"pooling": 1, "resampler": 1, "pruning": 1}
    analytic = F.qmop_analytic_flops(model.config, 1, preset.prompt_tokens, 16, preset.query_tokens,
                                     branch_images=counted["branch_images"])
    assert counted["components"]["branches"] == analytic.as_dict()["branches"]
    assert counted["whole_forward"] == counted["components"]["total"]
