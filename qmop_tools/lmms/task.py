"""The mini VTCBench test split as a local lmms-eval task: a folder with the data and the task's YAML, no download.

    qmop lmms-task --output outputs/lmms-task [--images 40] [--seed 0] [--layout pair|tag] [--data DIR]

writes `<output>/test.parquet` (one row per question: id, image, question, answer, dimension, in the order of the
split's `test_vqa.json`) and `<output>/mini_vtcbench.yaml`; lmms-eval reads the folder with
`--include_path <output> --tasks mini_vtcbench`. The questions, pictures and scoring are those of our own evaluation
(`qmop_tools.vtcbench.experiment.evaluate`): the prompt is the question under one image, and an answer is right when
its first word (`normalise_answer`) is the expected word. `--data` reuses a split already on disk
(`data.write_dataset`), otherwise the first `--images` test pictures of `--seed` and `--layout` (default: the
benchmark's, `Settings.data_layout`; the bundled checkpoint's is in its `vtcbench_results.json`) are drawn into
`<output>/source`.

The YAML's functions (`doc_to_messages`, `process_results`, ...) are this module's: lmms-eval imports them by their
dotted name, so the package must be importable where lmms-eval runs (`pip install -e ".[lmms]"`).
"""

import argparse
import json
import os
from typing import Optional

TASK_NAME = "mini_vtcbench"
MAX_NEW_TOKENS = 3  # as our evaluation: answers are one word
TASK_YAML = f"""\
# Written by qmop_tools/lmms/task.py: the mini VTCBench test split, scored as qmop_tools.vtcbench evaluates it.
task: {TASK_NAME}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: test.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function qmop_tools.lmms.task.doc_to_visual
doc_to_text: !function qmop_tools.lmms.task.doc_to_text
doc_to_messages: !function qmop_tools.lmms.task.doc_to_messages
doc_to_target: answer
process_results: !function qmop_tools.lmms.task.process_results
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  do_sample: false
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


# ============================================================================================ task functions
def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: Optional[dict] = None) -> str:
    return doc["question"]


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs: Optional[dict] = None) -> list:
    """One user turn: the image, then the question (what `evaluate` renders through the chat template)."""
    return [{"role": "user", "content": [{"type": "image", "url": doc_to_visual(doc)[0]},
                                         {"type": "text", "text": doc_to_text(doc)}]}]


def process_results(doc: dict, results: list) -> dict:
    from qmop_tools.vtcbench.experiment import normalise_answer

    return {"accuracy": float(normalise_answer(results[0]) == doc["answer"])}


# ============================================================================================ the folder
def questions(data_dir: str, split: str = "test") -> list:
    """The split's questions as `evaluate` reads them: (id, image path, question, answer, dimension), in order."""
    with open(os.path.join(data_dir, f"{split}_vqa.json")) as f:
        samples = json.load(f)
    return [{"id": s["id"], "image": os.path.join(data_dir, "images", s["image"]),
             "question": s["conversations"][0]["value"].replace("<image>", "").strip(),
             "answer": s["conversations"][1]["value"], "dimension": s["dimension"]} for s in samples]


def write_task(output_dir: str, data_dir: Optional[str] = None, images: int = 40, seed: int = 0,
               layout: Optional[str] = None) -> str:
    """Write the task folder (data embedded in `test.parquet`, the YAML beside it); returns the YAML's path."""
    from datasets import Dataset, Features, Image, Value

    from qmop_tools.vtcbench.data import write_dataset
    from qmop_tools.vtcbench.experiment import Settings

    os.makedirs(output_dir, exist_ok=True)
    if data_dir is None:
        data_dir = os.path.join(output_dir, "source")
        write_dataset(data_dir, {"test": images}, seed=seed, layout=layout or Settings().data_layout)
    rows = questions(data_dir)
    for row in rows:
        with open(row["image"], "rb") as f:
            row["image"] = {"bytes": f.read(), "path": os.path.basename(row["image"])}
    features = Features({"id": Value("string"), "image": Image(), "question": Value("string"),
                         "answer": Value("string"), "dimension": Value("string")})
    Dataset.from_list(rows, features=features).to_parquet(os.path.join(output_dir, "test.parquet"))
    path = os.path.join(output_dir, f"{TASK_NAME}.yaml")
    with open(path, "w") as f:
        f.write(TASK_YAML)
    return path


def main(argv=None) -> None:
    from qmop_tools.vtcbench.data import LAYOUTS

    parser = argparse.ArgumentParser(prog="qmop lmms-task", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="task folder to write (pass it to lmms-eval's --include_path)")
    parser.add_argument("--images", type=int, default=40, help="test pictures to draw (5 questions each)")
    parser.add_argument("--seed", type=int, default=0, help="data seed of the mini VTCBench")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="data layout of the mini VTCBench (default: the benchmark's; the bundled checkpoint "
                        "was trained on its vtcbench_results.json's settings.data_layout, 'tag' when absent)")
    parser.add_argument("--data", default=None, help="an existing mini VTCBench data folder to use instead")
    args = parser.parse_args(argv)
    path = write_task(args.output, args.data, args.images, args.seed, args.layout)
    print(f"wrote {path}: python -m lmms_eval --model qmop --model_args pretrained=<QMoP folder> "
          f"--include_path {args.output} --tasks {TASK_NAME}")


if __name__ == "__main__":
    main()
