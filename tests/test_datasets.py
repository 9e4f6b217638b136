"""datasets with a remote-code QMoP processor: a stable fingerprint (a second `map` is a cache hit, also in another
process) and mapped data that collates with transformers' `default_data_collator` (Trainer and a plain DataLoader),
the recipe of docs/training.md."""

import os
import subprocess
import sys

import pytest
import torch

datasets = pytest.importorskip("datasets", reason="datasets is in requirements/*.txt; not installed here")
from datasets.fingerprint import Hasher  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments, default_data_collator  # noqa: E402

from conftest import make_image  # noqa: E402

TEXTS = ["USER: <image>\nWhat colour is the circle? ASSISTANT: red", "USER: <image>\nHow many? ASSISTANT: three"]


def _hash_in_a_new_process(path: str) -> str:
    code = (
        "import sys; from transformers import AutoProcessor; from datasets.fingerprint import Hasher; "
        "print(Hasher.hash(AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)))"
    )
    result = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ""}, cwd=os.path.dirname(path))
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def _prepare(processor):
    def prepare(batch):
        out = processor(images=batch["image"], text=batch["text"], padding="max_length", max_length=64,
                        return_tensors=None)
        out["labels"] = [[t if m else -100 for t, m in zip(ids, mask)]
                         for ids, mask in zip(out["input_ids"], out["attention_mask"])]
        return out

    return prepare


@pytest.fixture(scope="module")
def raw_dataset():
    return datasets.Dataset.from_dict({"image": [make_image(seed=s) for s in range(4)], "text": TEXTS * 2})


def test_processor_fingerprint_is_stable_and_map_hits_the_cache(tiny_checkpoint, raw_dataset, tmp_path):
    first = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    second = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert type(first).__module__.startswith("transformers_modules")  # the remote-code class
    assert Hasher.hash(first) == Hasher.hash(second) == _hash_in_a_new_process(tiny_checkpoint)

    dataset = raw_dataset.map(lambda x: x, cache_file_name=str(tmp_path / "raw.arrow"))  # on disk: maps are cached
    mapped = dataset.map(_prepare(first), batched=True, remove_columns=["image", "text"])
    again = dataset.map(_prepare(second), batched=True, remove_columns=["image", "text"])
    assert mapped._fingerprint == again._fingerprint  # a random fingerprint would differ
    assert again.cache_files == mapped.cache_files  # the second map read the first one's cache file


def test_mapped_data_collates_for_a_dataloader_and_the_trainer(tiny_checkpoint, raw_dataset, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    mapped = raw_dataset.map(_prepare(processor), batched=True, remove_columns=["image", "text"]).with_format("torch")
    batch = next(iter(torch.utils.data.DataLoader(mapped, batch_size=4, collate_fn=default_data_collator)))
    assert batch["query_input_ids"].shape == (4, processor.query_max_length)
    assert batch["pixel_values"].shape[0] == 4 and batch["input_ids"].shape == (4, 64)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2,
                             report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3)
    result = Trainer(model=model, args=args, train_dataset=mapped, data_collator=default_data_collator).train()
    assert result.global_step == 2 and result.training_loss > 0
