"""Run in the vLLM environment (QMOP_VLLM_PYTHON) by tests/test_vllm_plugin.py: greedy generation through vLLM's
offline `LLM` with the QMoP plugin (found through its `vllm.general_plugins` entry point), for several checkpoints
one after another in this one process, written as JSON.

    python tests/vllm_runner.py SPEC.json OUT.json

SPEC: {"max_tokens": 8, "engines": [{"name", "model", "engine_kwargs"?: {LLM arguments},
      "requests": [{"prompt", "images": [png paths], "mm_processor_kwargs"?}],
      "runs": [{"name", "requests": [indices], "batched": bool, "expect_error"?: bool}],
      "expect_init_error"?: bool (the engine must refuse the model: its error message is recorded),
      "bench"?: {keyword arguments of qmop_tools.bench.vllm_serving.measure}}]}
OUT:  {engine name: {"runs": {run name: [{"prompt_token_ids", "token_ids"}, ...] or {"error": message}},
      "mm_cache": {run name: {"queries", "hits"}}, "init_s": seconds, "bench"?: rows}}   (mm_cache: images looked
      up in / found in the multimodal processor cache during the run; bench: the serving benchmark's rows, measured
      on this engine after the runs)
"""

import gc
import json
import sys
import time
from importlib.metadata import entry_points


def _mm_cache_counts(llm) -> dict:
    """Cumulative multimodal-cache lookups and hits of this engine (vLLM's own metrics)."""
    names = {"vllm:mm_cache_queries": "queries", "vllm:mm_cache_hits": "hits"}
    counts = {"queries": 0, "hits": 0}
    for metric in llm.get_metrics():
        if metric.name in names:
            counts[names[metric.name]] += metric.value
    return counts


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as file:
        spec = json.load(file)
    plugins = [ep.value for ep in entry_points(group="vllm.general_plugins")]
    if "qmop_tools.serve:register" not in plugins:
        raise SystemExit(f"the QMoP plugin is not installed in this environment (vllm.general_plugins: {plugins})")

    from PIL import Image
    from vllm import LLM, SamplingParams

    n = spec["max_tokens"]
    greedy = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
    results = {}
    for engine in spec["engines"]:
        start = time.perf_counter()
        try:
            llm = LLM(model=engine["model"], trust_remote_code=True, dtype="float32", enforce_eager=True, seed=0,
                      max_model_len=512, max_num_seqs=8, max_num_batched_tokens=2048, limit_mm_per_prompt={"image": 2},
                      disable_log_stats=False, **engine.get("engine_kwargs", {}))
        except Exception as error:  # noqa: BLE001 - an engine the plugin must refuse: its message is checked
            if not engine.get("expect_init_error"):
                raise
            results[engine["name"]] = {"init_error": f"{type(error).__name__}: {error}", "init_s": 0.0}
            gc.collect()
            continue
        if engine.get("expect_init_error"):
            raise SystemExit(f"engine {engine['name']!r} was expected to be refused but started")
        init_s = time.perf_counter() - start
        requests = []
        for request in engine["requests"]:
            prompt = {"prompt": request["prompt"],
                      "multi_modal_data": {"image": [Image.open(path).convert("RGB") for path in request["images"]]}}
            if request.get("mm_processor_kwargs"):
                prompt["mm_processor_kwargs"] = request["mm_processor_kwargs"]
            requests.append(prompt)
        runs, mm_cache = {}, {}
        for run in engine["runs"]:
            chosen = [requests[i] for i in run["requests"]]
            before = _mm_cache_counts(llm)
            if run.get("expect_error"):  # a bad request: its error message, and the engine must keep serving
                try:
                    llm.generate(chosen, greedy, use_tqdm=False)
                except Exception as error:  # noqa: BLE001 - the message is what the test checks
                    runs[run["name"]] = {"error": f"{type(error).__name__}: {error}"}
                    continue
                raise SystemExit(f"run {run['name']!r} was expected to fail but did not")
            if run["batched"]:
                outputs = llm.generate(chosen, greedy, use_tqdm=False)
            else:
                outputs = [llm.generate([r], greedy, use_tqdm=False)[0] for r in chosen]
            runs[run["name"]] = [
                {"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids)}
                for o in outputs
            ]
            after = _mm_cache_counts(llm)
            mm_cache[run["name"]] = {key: after[key] - before[key] for key in after}
        results[engine["name"]] = {"runs": runs, "mm_cache": mm_cache, "init_s": init_s}
        if "bench" in engine:
            from qmop_tools.bench.vllm_serving import measure

            results[engine["name"]]["bench"] = measure(llm, **engine["bench"])
        del llm
        gc.collect()
    with open(out_path, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":  # vLLM's CPU backend starts processes with spawn: nothing may run at import
    main(sys.argv[1], sys.argv[2])
