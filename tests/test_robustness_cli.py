"""Bad arguments and faults at the command-line entry points (issue 13): the converter, the trainer, the demo and the
benchmark. Every check runs before any work (no model loaded, nothing written); nothing the user owns is deleted;
outputs appear only when complete; a run killed while saving a checkpoint resumes from the last complete one.
Each case asserts the exception type (or exit status) and a message fragment that names the argument."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file
from test_conversion import _settings, sources  # noqa: F401  (module fixture: tiny llava-hf + CLIP folders)
from test_training import BUDGET, write_dataset

from conversion import ConversionError, convert, converter
from qmop_tools.testing.tiny import save_tiny_checkpoint
from qmop_tools.train import main as train_main
from qmop_tools.train.resume import checkpoint_problem, last_complete_checkpoint, resolve_resume

CONVERTER = [sys.executable, "-m", "conversion"]  # `qmop convert`


def _tree(folder):
    """{relative path: bytes} of every file under folder."""
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def _raises(error, fragment, function, *args, **kwargs):
    with pytest.raises(error) as raised:
        function(*args, **kwargs)
    assert fragment in str(raised.value), str(raised.value)


# ===================================================================================== converter: before any work
@pytest.fixture(scope="module")
def sources_copy(sources, tmp_path_factory):  # noqa: F811
    """A disposable copy of the llava-hf source, for cases that point --output at or into it."""
    return str(shutil.copytree(sources["hf_dir"], tmp_path_factory.mktemp("copy") / "llava-hf"))


@pytest.mark.parametrize(
    "where, fragment",
    [("llava", "is the --llava checkpoint"), ("inside-llava", "is inside the --llava checkpoint"),
     ("contains-clip", "contains the --clip checkpoint")],
)
def test_output_never_overlaps_a_source(sources, sources_copy, where, fragment):  # noqa: F811
    before = _tree(sources_copy)
    output = {"llava": sources_copy, "inside-llava": os.path.join(sources_copy, "qmop"),
              "contains-clip": os.path.dirname(sources["clip_dir"])}[where]
    settings = _settings(sources, "unused", llava=sources_copy, output=output, overwrite=True)
    _raises(ConversionError, fragment, convert, settings)
    assert _tree(sources_copy) == before  # the source is untouched


def test_output_through_a_symlink_to_the_source_is_refused(sources, sources_copy, tmp_path):  # noqa: F811
    link = tmp_path / "link-to-source"
    link.symlink_to(sources_copy)
    _raises(ConversionError, "is the --llava checkpoint", convert,
            _settings(sources, "unused", llava=sources_copy, output=str(link), overwrite=True))
    assert os.path.isfile(os.path.join(sources_copy, "config.json"))


@pytest.mark.parametrize(
    "changes, error, fragment",
    [
        (dict(max_shard_size="5XB"), ConversionError, "--max-shard-size '5XB' is not a size"),
        (dict(max_shard_size="0GB"), ConversionError, "--max-shard-size '0GB' must be at least 1 byte"),
        (dict(max_shard_size="GB"), ConversionError, "is not a size"),
        (dict(config_overrides={"router_topk": 1}), ConversionError, "router_topk: not a QMoPConfig field. Did you mean 'router_top_k'?"),
        (dict(config_overrides={"colour": 1}), ConversionError, "--config-override colour: not a QMoPConfig field."),
        (dict(config_overrides={"num_visual_tokens": 4}), ConversionError, "num_visual_tokens: set by the converter from --num-visual-tokens"),
        (dict(config_overrides={"vision_config": {}}), ConversionError, "vision_config: set by the converter"),
        (dict(config_overrides={"router_top_k": "1"}), ConversionError, "`router_top_k` must be an integer, got '1'"),
        (dict(config_overrides={"router_top_k": 5}), ConversionError, "`router_top_k`=5 must be between 1 and"),
        (dict(config_overrides={"pruning_score": "largest"}), ConversionError, "`pruning_score` must be one of"),
        (dict(dtype="float64"), ConversionError, "--dtype must be one of"),
        (dict(num_visual_tokens=0), ValueError, "--num-visual-tokens must be a positive perfect square (e.g. 64, 144), got 0"),
        (dict(num_visual_tokens=15), ValueError, "perfect square"),
        (dict(verify_new_tokens=0), ConversionError, "--verify-new-tokens must be >= 1"),
        (dict(atol=-1.0), ConversionError, "--atol must be >= 0"),
    ],
    ids=["shard-unit", "shard-zero", "shard-no-number", "override-misspelt", "override-unknown", "override-budget",
         "override-subconfig", "override-string", "override-top-k", "override-choice", "dtype", "budget-0",
         "budget-15", "verify-tokens", "atol"],
)
def test_bad_settings_fail_before_any_work(sources, tmp_path, monkeypatch, changes, error, fragment):  # noqa: F811
    def no_work(*args, **kwargs):
        raise AssertionError("the sources were read before the settings were checked")

    monkeypatch.setattr(converter, "load_sources", no_work)
    _raises(error, fragment, convert, _settings(sources, "unused", output=str(tmp_path / "out"), **changes))
    assert not (tmp_path / "out").exists()


def test_output_below_a_regular_file(sources, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(converter, "load_sources", None)  # never reached
    (tmp_path / "notes.txt").write_text("mine")
    _raises(ConversionError, "is below " + str(tmp_path / "notes.txt") + ", which is a file", convert,
            _settings(sources, "unused", output=str(tmp_path / "notes.txt" / "sub" / "qmop")))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_existing_file_at_output_is_kept(sources, tmp_path):  # noqa: F811
    (tmp_path / "qmop").write_text("mine")
    _raises(ConversionError, "already exists; pass --overwrite", convert,
            _settings(sources, "unused", output=str(tmp_path / "qmop")))
    assert (tmp_path / "qmop").read_text() == "mine"


def test_cli_reports_bad_shard_size_with_status_1(sources, tmp_path, capsys):  # noqa: F811
    from conversion.cli import main

    status = main(["--llava", sources["hf_dir"], "--clip", sources["clip_dir"], "--output", str(tmp_path / "out"),
                   "--max-shard-size", "5XB"])
    assert status == 1
    assert "error: --max-shard-size '5XB' is not a size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_a_malformed_override(sources, tmp_path, capsys):  # noqa: F811
    from conversion.cli import main

    with pytest.raises(SystemExit) as raised:
        main(["--llava", sources["hf_dir"], "--clip", sources["clip_dir"], "--output", str(tmp_path / "o"),
              "--config-override", "router_top_k"])
    assert raised.value.code == 2 and "expected KEY=VALUE" in capsys.readouterr().err


# ===================================================================================== converter: damaged sources
@pytest.mark.parametrize("missing", ["llava", "clip"])
def test_source_without_tokenizer(sources, tmp_path, missing):  # noqa: F811
    key = {"llava": "hf_dir", "clip": "clip_dir"}[missing]
    folder = shutil.copytree(sources[key], tmp_path / missing)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (folder / name).exists():
            os.remove(folder / name)
    _raises(ConversionError, f"--{missing} {folder} has no tokenizer", convert,
            _settings(sources, "unused", output=str(tmp_path / "out"), **{missing: str(folder)}))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep_bytes", [100, -1000], ids=["header-cut", "data-cut"])
def test_truncated_safetensors_is_named(sources, tmp_path, keep_bytes):  # noqa: F811
    folder = shutil.copytree(sources["hf_dir"], tmp_path / "llava")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep_bytes])
    _raises(ConversionError, f"{weights} is not a readable weight file (truncated or corrupt?", convert,
            _settings(sources, "unused", llava=str(folder), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


# ===================================================================================== converter: races and signals
def test_folder_appearing_at_output_during_the_run_is_left_alone(sources, tmp_path, monkeypatch):  # noqa: F811
    output = tmp_path / "qmop"

    def another_process_writes_there(stage):
        if stage == "verified":
            output.mkdir()
            (output / "theirs.txt").write_text("not yours")

    monkeypatch.setattr(converter, "_pause_if_requested", another_process_writes_there)
    _raises(ConversionError, f"--output {output} appeared while converting", convert,
            _settings(sources, "unused", output=str(output), num_visual_tokens=16))
    assert _tree(output) == {"theirs.txt": b"not yours"}
    kept = [p for p in os.listdir(tmp_path) if p.startswith("qmop.converted-")]
    assert len(kept) == 1 and os.path.isfile(tmp_path / kept[0] / "checkpoint" / "config.json")
    assert not [p for p in os.listdir(tmp_path) if ".incomplete-" in p]


def _default_sigint() -> None:
    """Run in the child before exec: Ctrl-C acts as in a terminal even when the test runner was started in the
    background (a non-interactive shell starts background jobs with SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _convert_until(sources, output, stage, *extra):  # noqa: F811
    proc = subprocess.Popen(
        [*CONVERTER, "--llava", sources["hf_dir"], "--clip", sources["clip_dir"], "--output", str(output),
         "--num-visual-tokens", "16", "--dtype", "float32", "--verify-new-tokens", "2", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
        env=dict(os.environ, **{converter.PAUSE_ENV: stage}), preexec_fn=_default_sigint,
    )
    lines, deadline = [], time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("QMOP_CONVERT_PAUSED"):
            return proc
    proc.kill()
    raise AssertionError("".join(lines[-30:]))


@pytest.mark.parametrize("sig, stage", [(signal.SIGINT, "saved"), (signal.SIGKILL, "verified")], ids=["sigint", "sigkill"])
def test_interrupted_overwrite_keeps_the_old_output(sources, tmp_path, sig, stage):  # noqa: F811
    """--overwrite replaces the old folder only at the very end: killed or interrupted before, it is intact."""
    output = tmp_path / "qmop"
    output.mkdir()
    (output / "old.txt").write_text("previous conversion")
    proc = _convert_until(sources, output, stage, "--overwrite")
    proc.send_signal(sig)
    status = proc.wait(timeout=60)
    proc.stdout.close()
    assert status != 0
    assert _tree(output) == {"old.txt": b"previous conversion"}
    leftovers = [p for p in os.listdir(tmp_path) if ".incomplete-" in p]
    assert leftovers == ([] if sig == signal.SIGINT else leftovers)  # Ctrl-C cleans up; SIGKILL cannot
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith(".")) == ["qmop"]


# ===================================================================================== trainer
@pytest.fixture(scope="module")
def train_space(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust-train")
    base = save_tiny_checkpoint(str(root / "base"), num_visual_tokens=BUDGET)
    data, images = write_dataset(str(root), num_image_samples=8, num_text_samples=0)
    llava = root / "llava-hf"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}))
    return {"root": root, "base": base, "data": data, "images": images, "llava": str(llava)}


def _train_args(space, output, **changes):
    values = {
        "--model_name_or_path": space["base"], "--stage": "1", "--data_path": space["data"],
        "--image_folder": space["images"], "--output_dir": str(output), "--per_device_train_batch_size": "2",
        "--learning_rate": "1e-3", "--logging_steps": "1", "--save_strategy": "steps", "--save_steps": "2",
        "--max_steps": "4", "--report_to": "none", "--use_cpu": "true", "--seed": "0", "--dataloader_num_workers": "0",
        "--disable_tqdm": "true",
    }
    values.update(changes)
    return [str(x) for pair in values.items() for x in pair if x is not None]


def _string_turns(space):
    path = space["root"] / "string-turns.json"
    path.write_text(json.dumps([{"image": "sub/0.png", "conversations": ["what is it?", "a cat"]}] * 2))
    return str(path)


@pytest.mark.parametrize(
    "changes, error, fragment",
    [
        (lambda s: {"--model_name_or_path": s["llava"]}, ValueError, "is a 'llava' checkpoint, not QMoP-LLaVA ('qmop_llava'). It is a LLaVA checkpoint: convert it first"),
        (lambda s: {"--model_name_or_path": s["data"]}, ValueError, "--model_name_or_path " + "{data!r} is a file"),
        (lambda s: {"--model_name_or_path": s["images"]}, ValueError, "has no config.json: not a model checkpoint folder"),
        (lambda s: {"--data_path": _string_turns(s)}, ValueError, "none of its 2 samples holds LLaVA conversations (sample 0: turn 0 is 'what is it?'"),
        (lambda s: {"--data_path": s["data"] + ".missing"}, FileNotFoundError, "`data_path` {missing!r} does not exist"),
        (lambda s: {"--image_folder": s["images"] + "-missing"}, FileNotFoundError, "`--image_folder` {images_missing!r} is not a folder"),
        (lambda s: {"--output_dir": s["data"]}, ValueError, "--output_dir {data!r} is an existing file; expected a folder"),
        (lambda s: {"--resume_from_checkpoint": "true"}, ValueError, "`--resume_from_checkpoint true`: no complete checkpoint-N"),
        (lambda s: {"--resume_from_checkpoint": s["images"] + "-nothing"}, ValueError, "does not exist"),
    ],
    ids=["llava-hf-checkpoint", "model-is-a-file", "model-without-config", "string-turns", "missing-data",
         "missing-image-folder", "output-is-a-file", "resume-nothing", "resume-missing-path"],
)
def test_trainer_arguments_fail_before_loading(train_space, monkeypatch, changes, error, fragment):
    import importlib

    run_module = importlib.import_module("qmop_tools.train.run")  # the package re-exports a function named `run`

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(run_module, "load_model_and_processor", no_load)
    output = train_space["root"] / "out-bad"
    fragment = fragment.format(data=train_space["data"], missing=train_space["data"] + ".missing",
                               images_missing=train_space["images"] + "-missing")
    _raises(error, fragment, train_main, _train_args(train_space, output, **changes(train_space)))


def test_resume_from_an_explicit_incomplete_checkpoint(train_space, tmp_path):
    checkpoint = tmp_path / "checkpoint-6"
    checkpoint.mkdir()
    torch.save({}, checkpoint / "optimizer.pt")
    _raises(ValueError, f"`--resume_from_checkpoint` {str(checkpoint)!r} is not a complete checkpoint: no trainer_state.json",
            resolve_resume, str(checkpoint), str(tmp_path))


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda c: os.remove(c / "trainer_state.json"), "no trainer_state.json (the save was interrupted)"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_st'), "trainer_state.json is unreadable"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": 3}'), "records step 3, not 2"),
        (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:50]), "model.safetensors is unreadable"),
        (lambda c: os.remove(c / "model.safetensors"), "no model weights"),
    ],
    ids=["no-state", "cut-state", "wrong-step", "cut-weights", "no-weights"],
)
def test_incomplete_checkpoints_are_recognised(tmp_path, damage, fragment):
    from safetensors.torch import save_file

    good, bad = tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"
    for folder, step in ((good, 1), (bad, 2)):
        folder.mkdir()
        save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert checkpoint_problem(str(bad)) is None
    damage(bad)
    assert fragment in checkpoint_problem(str(bad))
    assert last_complete_checkpoint(str(tmp_path)) == str(good)


def test_string_turns_among_good_samples_are_skipped_and_counted(train_space):
    from qmop_tools.testing.tiny import build_processor
    from qmop_tools.train import LazyLLaVADataset

    path = train_space["root"] / "mixed.json"
    good = json.loads(open(train_space["data"]).read())[1]
    path.write_text(json.dumps([{"image": "sub/0.png", "conversations": ["what is it?", "a cat"]}, good]))
    dataset = LazyLLaVADataset(str(path), build_processor(num_visual_tokens=BUDGET), train_space["images"])
    item = dataset[0]
    assert item["input_ids"].shape[0] > BUDGET and dict(dataset.skipped) == {"malformed_turn": 1}


PAUSING_DRIVER = """
import sys, time
from transformers.trainer_callback import TrainerState
original = TrainerState.save_to_json
def save_to_json(self, path):
    if "checkpoint-4" in path:  # the last write of a checkpoint: everything else of checkpoint-4 is on disk
        print("QMOP_TRAIN_PAUSED", flush=True)
        time.sleep(600)
    return original(self, path)
TrainerState.save_to_json = save_to_json
from qmop_tools.train import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def uninterrupted(train_space):
    output = train_space["root"] / "uninterrupted"
    train_main(_train_args(train_space, output))
    return load_file(str(output / "model.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "sigint"])
def test_trainer_killed_while_saving_resumes_from_the_last_complete_checkpoint(train_space, uninterrupted, sig):
    output = train_space["root"] / f"killed-{sig.name}"
    driver = train_space["root"] / "pausing_driver.py"
    driver.write_text(textwrap.dedent(PAUSING_DRIVER))
    proc = subprocess.Popen([sys.executable, str(driver), *_train_args(train_space, output)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT), preexec_fn=_default_sigint)
    lines, deadline = [], time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line or line.startswith("QMOP_TRAIN_PAUSED"):
            break
        lines.append(line)
    assert line.startswith("QMOP_TRAIN_PAUSED"), "".join(lines[-30:])
    proc.send_signal(sig)
    assert proc.wait(timeout=60) != 0
    proc.stdout.close()
    assert checkpoint_problem(str(output / "checkpoint-4")) == "no trainer_state.json (the save was interrupted)"
    assert checkpoint_problem(str(output / "checkpoint-2")) is None
    assert not (output / "model.safetensors").exists()  # no final model from an interrupted run

    result = train_main(_train_args(train_space, output, **{"--resume_from_checkpoint": "true"}))
    assert [e["step"] for e in result.trainer.state.log_history if "loss" in e] == [1, 2, 3, 4]
    resumed = load_file(str(output / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


# ===================================================================================== demo
@pytest.mark.parametrize(
    "argv, error, fragment",
    [
        (lambda s, t: ["--model", s["llava"]], ValueError, "is a 'llava' checkpoint, not QMoP-LLaVA"),
        (lambda s, t: ["--model", s["images"]], ValueError, "has no config.json"),
        (lambda s, t: ["--model", s["base"], "--image", "/nonexistent/picture.png"], FileNotFoundError,
         "--image '/nonexistent/picture.png' is not an existing file or an http(s) URL"),
        (lambda s, t: ["--model", s["base"], "--num-visual-tokens", "15"], ValueError, "--num-visual-tokens must be a positive perfect square"),
        (lambda s, t: ["--model", s["base"], "--num-visual-tokens", "0"], ValueError, "got 0"),
        (lambda s, t: ["--model", s["base"], "--max-new-tokens", "0"], ValueError, "--max-new-tokens must be >= 1, got 0"),
        (lambda s, t: ["--model", s["base"], "--picture", s["data"] + "/demo.png"], ValueError, "which is a file, not a folder"),
        (lambda s, t: ["--model", s["base"], "--picture", str(t)], ValueError, "is a folder; expected a file path"),
    ],
    ids=["llava-hf", "no-config", "missing-image", "budget-15", "budget-0", "max-new-tokens", "picture-below-file",
         "picture-is-folder"],
)
def test_demo_arguments_fail_before_loading(train_space, tmp_path, monkeypatch, argv, error, fragment):
    from qmop_tools import demo as demo_script

    monkeypatch.setattr(demo_script, "load", None)  # never reached
    _raises(error, fragment, demo_script.main, argv(train_space, tmp_path))


def test_demo_load_names_a_llava_checkpoint(train_space):
    from qmop_tools.demo import load

    _raises(ValueError, "convert it first", load, train_space["llava"])


# ===================================================================================== benchmark
@pytest.mark.parametrize(
    "argv, fragment",
    [
        (lambda p: ["--output", p["file"]], "--output {file!r} is an existing file; expected a folder"),
        (lambda p: ["--output", p["file"] + "/sub"], "which is a file, not a folder"),
        (lambda p: ["--budgets", "10"], "--budgets [10] are not positive perfect squares"),
        (lambda p: ["--budgets", "0", "16"], "--budgets [0] are not positive perfect squares"),
        (lambda p: ["--device", "gpu"], "--device 'gpu' is not a device"),
        (lambda p: ["--threads", "0"], "--threads must be >= 1, got 0"),
        (lambda p: ["--prompt-tokens", "1"], "--prompt-tokens must be >= 2, got 1"),
        (lambda p: ["--memory-budget-gib", "0"], "--memory-budget-gib must be > 0"),
        (lambda p: ["--qmop-path", p["folder"]], "--qmop-path {folder!r} is not a checkpoint folder (no config.json)"),
    ],
    ids=["output-file", "output-below-file", "budget-10", "budget-0", "device", "threads", "prompt-tokens",
         "memory-budget", "qmop-path"],
)
def test_benchmark_arguments_fail_before_measuring(tmp_path, monkeypatch, argv, fragment):
    import qmop_tools.bench.runner as runner
    from qmop_tools.bench.cli import main

    monkeypatch.setattr(runner, "build_llava", None)  # never reached
    paths = {"file": str(tmp_path / "results.json"), "folder": str(tmp_path)}
    open(paths["file"], "w").close()
    arguments = ["--preset", "smoke", "--output", str(tmp_path / "out")] + argv(paths)
    _raises(ValueError, fragment.format(**paths), main, arguments)
    assert not (tmp_path / "out").exists() and os.path.getsize(paths["file"]) == 0
