"""lmms-eval on the local mini VTCBench task: `python -m lmms_eval --model qmop` with the bundled checkpoint answers
every question as our own evaluation (`qmop_tools.vtcbench.experiment.evaluate`) does, so the accuracies are equal.

lmms-eval lives in its own environment (.venv-lmms, scripts/setup_env.sh); scripts/test.sh passes its python in
QMOP_LMMS_PYTHON for the transformers-5 run. lmms-eval runs offline in a child process, from a folder outside the
repository, so the model entry is found the way a user's install finds it (the `lmms_eval.models` entry point)."""

import glob
import json
import os
import subprocess

import pytest
import torch

from conftest import REPO_ROOT

from qmop_tools.lmms.task import TASK_NAME, write_task
from qmop_tools.vtcbench.data import write_dataset
from qmop_tools.vtcbench.experiment import evaluate, normalise_answer
from qmop_tools.vtcbench.report import exported_layout

LMMS_PYTHON = os.environ.get("QMOP_LMMS_PYTHON")
BUNDLED = os.path.join(REPO_ROOT, "checkpoints", "qmop-tiny")
IMAGES = 8  # the first 8 test pictures: 40 questions

needs_lmms_eval = pytest.mark.skipif(
    not LMMS_PYTHON, reason="set QMOP_LMMS_PYTHON to the python of .venv-lmms (scripts/setup_env.sh) to run lmms-eval"
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(data folder, task folder): the mini VTCBench test split on disk and the lmms-eval task built from it."""
    root = tmp_path_factory.mktemp("lmms")
    write_dataset(str(root / "data"), {"test": IMAGES}, seed=0, layout=exported_layout(BUNDLED))
    write_task(str(root / "task"), data_dir=str(root / "data"))
    return str(root / "data"), str(root / "task")


def test_task_folder_holds_the_split_as_our_evaluation_reads_it(task, tmp_path):
    """Without lmms-eval: the parquet rows are the split's questions in order, the YAML's functions exist, and a
    doc becomes one user turn (image, then question) scored by the first word."""
    import yaml
    from datasets import load_dataset

    from qmop_tools.lmms import task as task_module

    data_dir, task_dir = task
    rows = load_dataset("parquet", data_files={"test": os.path.join(task_dir, "test.parquet")},
                        cache_dir=str(tmp_path / "cache"))["test"]
    expected = json.load(open(os.path.join(data_dir, "test_vqa.json")))
    assert rows["id"] == [s["id"] for s in expected] and len(rows) == IMAGES * 5
    assert rows["answer"] == [s["conversations"][1]["value"] for s in expected]
    assert rows[0]["image"].size == (144, 144)

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load(open(os.path.join(task_dir, f"{TASK_NAME}.yaml")), Loader=Loader)
    assert config["task"] == TASK_NAME and config["dataset_kwargs"]["data_files"]["test"] == "test.parquet"
    for key in ("doc_to_visual", "doc_to_text", "doc_to_messages", "process_results"):
        module, name = config[key].rsplit(".", 1)
        assert module == task_module.__name__ and callable(getattr(task_module, name))
    (turn,) = task_module.doc_to_messages(rows[0])
    assert turn["role"] == "user" and [c["type"] for c in turn["content"]] == ["image", "text"]
    assert turn["content"][1]["text"] == expected[0]["conversations"][0]["value"].replace("<image>", "").strip()
    answer = rows[0]["answer"]
    assert task_module.process_results(rows[0], [f" {answer.capitalize()}. more"]) == {"accuracy": 1.0}
    assert task_module.process_results(rows[0], [f"not {answer}"]) == {"accuracy": 0.0}


def run_lmms_eval(task_dir: str, output: str, model_args: str, batch_size: int, limit=None) -> tuple:
    """lmms-eval's command line, offline; returns (task accuracy, answers in question order)."""
    command = [LMMS_PYTHON, "-m", "lmms_eval", "--model", "qmop", "--model_args", model_args,
               "--include_path", task_dir, "--tasks", TASK_NAME, "--batch_size", str(batch_size), "--device", "cpu",
               "--output_path", output, "--log_samples"]
    if limit is not None:
        command += ["--limit", str(limit)]
    threads = str(torch.get_num_threads())  # as this process: the same float sums, so the same greedy answers
    env = dict(os.environ, HF_HOME=os.path.join(output, "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=output, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    (results_file,) = glob.glob(os.path.join(output, "*", "*_results.json"))
    (samples_file,) = glob.glob(os.path.join(output, "*", f"*_samples_{TASK_NAME}.jsonl"))
    accuracy = json.load(open(results_file))["results"][TASK_NAME]["accuracy,none"]
    samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(samples)))
    return accuracy, [s["filtered_resps"] for s in samples]


def check_same_as_ours(accuracy, answers, ours):
    ours_answers = [p["prediction"] for p in ours["predictions"]]
    assert len(answers) == ours["count"]
    assert [normalise_answer(a) for a in answers] == [normalise_answer(a) for a in ours_answers]
    assert accuracy == pytest.approx(ours["overall"], abs=1e-12)
    # the items separate right from wrong answers, so equal accuracy is not equal by construction
    assert 0 < ours["overall"] < 1, ours["overall"]


@needs_lmms_eval
def test_lmms_eval_accuracy_equals_our_evaluation(task, tmp_path):
    data_dir, task_dir = task
    accuracy, answers = run_lmms_eval(task_dir, str(tmp_path), f"pretrained={BUNDLED}", batch_size=10)
    ours = evaluate(BUNDLED, data_dir, "test", batch_size=10)
    assert ours["count"] == IMAGES * 5
    check_same_as_ours(accuracy, answers, ours)


@needs_lmms_eval
def test_lmms_eval_budget_and_ragged_batches(task, tmp_path):
    """`num_visual_tokens` in --model_args reaches the processor; --limit with a last batch shorter than the rest."""
    data_dir, task_dir = task
    accuracy, answers = run_lmms_eval(task_dir, str(tmp_path), f"pretrained={BUNDLED},num_visual_tokens=16",
                                      batch_size=4, limit=15)
    ours = evaluate(BUNDLED, data_dir, "test", batch_size=4, limit=15, num_visual_tokens=16)
    check_same_as_ours(accuracy, answers, ours)
