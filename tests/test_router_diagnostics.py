"""The router diagnostic (qmop_tools/vtcbench/router_diagnostics.py): its grid equals the model's own forward, its
metrics on routers that read only one input and on hand-computed tables, the CLI end to end on a tiny checkpoint."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import make_image

from qmop_tools.testing.tiny import build_tiny
from qmop_tools.vtcbench import router_diagnostics as rd

QUESTIONS = [
    "what colour is the background?",
    "how many objects are there?",
    "what letter is written on the sign?",
    "describe the picture.",
    "is the texture striped or dotted?",
    "where is the dog?",
]
TYPES = ["global", "counting", "local", "global", "style", "spatial"]


def pictures(count=6):
    """Pictures that differ in more than noise: a solid colour each, with noise on top."""
    from PIL import Image

    rng = np.random.RandomState(0)
    out = []
    for k in range(count):
        base = rng.randint(0, 256, size=3)
        array = np.clip(base + rng.randn(48, 48, 3) * 40, 0, 255).astype("uint8")
        out.append(Image.fromarray(array))
    return out


def routed_tiny(seed=0, **config):
    """A tiny model whose router has weights of std 1 (random-init logits are too close to tie-free routing)."""
    model, processor = build_tiny(num_visual_tokens=16, seed=seed, **config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for linear in (model.projector.router.linear_1, model.projector.router.linear_2):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator))
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=generator))
    return model, processor


@pytest.fixture(scope="module")
def routed():
    """A routed tiny model on which each half of the router alone changes the top-k set somewhere on the grid (so
    the flip-rate checks below are not vacuous); the first such seed, as random towers differ between versions."""
    for seed in range(10):
        model, processor = routed_tiny(seed=seed)
        by_question = rd.diagnose_router(zero_half(model, "vision"), processor, pictures(), QUESTIONS, TYPES, disable_tqdm=True)
        by_picture = rd.diagnose_router(zero_half(model, "query"), processor, pictures(), QUESTIONS, TYPES, disable_tqdm=True)
        if by_question.question_flip_rate > 0 and by_picture.picture_flip_rate > 0:
            return model, processor
    raise AssertionError("no seed gave a router whose top-k set changes with the picture and with the question")


def zero_half(model, half):
    """Zero the vision ("vision") or query ("query") columns of the router's first layer, in a copy."""
    import copy

    model = copy.deepcopy(model)
    vision_width = model.config.vision_config.hidden_size
    with torch.no_grad():
        weight = model.projector.router.linear_1.weight  # (hidden, Cv + Ct)
        weight[:, :vision_width] = 0.0 if half == "vision" else weight[:, :vision_width]
        weight[:, vision_width:] = 0.0 if half == "query" else weight[:, vision_width:]
    return model


# ===================================================================================== routers reading one input
def test_router_reading_both_inputs_varies_with_both(routed):
    model, processor = routed
    d = rd.diagnose_router(model, processor, pictures(), QUESTIONS, TYPES, disable_tqdm=True)
    assert 0.0 < d.question_share < 1.0 and 0.0 < d.picture_share < 1.0
    assert d.question_share + d.picture_share + d.interaction_share == pytest.approx(1.0)
    assert d.question_flip_rate > 0 and d.picture_flip_rate > 0
    assert (d.num_pictures, d.num_questions, d.top_k, d.eval_temperature) == (6, 6, 2, 0.1)
    assert d.branches == ["pooling", "resampler", "pruning"] and d.router_mode == "query"


def test_router_without_its_vision_half_is_all_question(routed):
    model, processor = zero_half(routed[0], "vision"), routed[1]
    d = rd.diagnose_router(model, processor, pictures(), QUESTIONS, TYPES, disable_tqdm=True)
    assert d.question_share == pytest.approx(1.0, abs=1e-6)
    assert d.picture_share == pytest.approx(0.0, abs=1e-6)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in d.question_share_per_branch.values())
    assert d.picture_flip_rate == 0.0
    assert d.question_flip_rate > 0.0


def test_router_without_its_query_half_is_all_picture(routed):
    model, processor = zero_half(routed[0], "query"), routed[1]
    d = rd.diagnose_router(model, processor, pictures(), QUESTIONS, TYPES, disable_tqdm=True)
    assert d.question_share == pytest.approx(0.0, abs=1e-6)
    assert d.picture_share == pytest.approx(1.0, abs=1e-6)
    assert d.question_flip_rate == 0.0
    assert d.picture_flip_rate > 0.0
    # Every type then sees the same pictures routed the same way: no information about the type.
    assert d.mutual_information_bits == pytest.approx(0.0, abs=1e-9)


def test_question_blind_router():
    model, processor = routed_tiny(router_mode="vision")
    d = rd.diagnose_router(model, processor, pictures(4), QUESTIONS[:3], TYPES[:3], disable_tqdm=True)
    assert d.router_mode == "vision"
    assert d.question_share == pytest.approx(0.0, abs=1e-9) and d.question_flip_rate == 0.0


@pytest.mark.parametrize("config", [dict(branches=["pooling"]), dict(router_mode="uniform")])
def test_model_without_router_is_refused(config):
    model, processor = build_tiny(num_visual_tokens=16, **config)
    with pytest.raises(ValueError, match="no router to diagnose"):
        rd.diagnose_router(model, processor, pictures(2), QUESTIONS[:2], disable_tqdm=True)


# ===================================================================================== exactness
def test_grid_equals_the_models_forward(routed):
    model, processor = routed
    images = pictures(3)
    model.train()  # the diagnostic must use eval mode, then restore every module's mode
    model.vision_tower.eval()
    d = rd.diagnose_router(model, processor, images, QUESTIONS, TYPES, batch_size=2, disable_tqdm=True)
    assert model.training and model.projector.router.training and not model.vision_tower.training
    model.eval()
    base = rd.diagnose_router(model.model, processor, images, QUESTIONS, TYPES, disable_tqdm=True)  # a QMoPModel
    np.testing.assert_allclose(base.grid.logits, d.grid.logits, atol=1e-5, rtol=1e-5)

    pairs = [(0, 0), (1, 3), (2, 5), (2, 1)]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[j]}]}],
            add_generation_prompt=True,
        )
        for _, j in pairs
    ]
    inputs = processor(images=[images[i] for i, _ in pairs], text=prompts, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    for row, (i, j) in enumerate(pairs):
        np.testing.assert_allclose(d.grid.logits[i, j], out.router_logits[row].numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(d.grid.probs[i, j], out.router_probs[row].numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(d.grid.weights[i, j], out.router_weights[row].numpy(), atol=1e-5, rtol=1e-5)
        assert np.array_equal(d.grid.weights[i, j] > 0, out.router_weights[row].numpy() > 0)


# ===================================================================================== pure metrics
def test_mutual_information_against_hand_computed_tables():
    # The type determines the branch: MI = H(type) = H(branch) = 1 bit.
    assert rd.mutual_information(["a", "a", "b", "b"], ["pool", "pool", "prune", "prune"]) == pytest.approx(1.0)
    # Independent: every type sees every branch equally often.
    assert rd.mutual_information(["a", "a", "b", "b"], ["pool", "prune", "pool", "prune"]) == pytest.approx(0.0)
    # p(a)=3/4, p(b)=1/4; p(pool)=p(prune)=1/2; joint (a,pool)=1/2, (a,prune)=1/4, (b,prune)=1/4:
    # MI = 1/2·log2(4/3) + 1/4·log2(2/3) + 1/4·log2(2).
    expected = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25
    assert rd.mutual_information(["a", "a", "a", "b"], ["pool", "pool", "prune", "prune"]) == pytest.approx(expected)
    assert rd.entropy_bits(["a", "a", "a", "b"]) == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    # Three types, the branch a function of the type (two types share a branch): MI = H(branch) < H(type).
    types, branches = ["a", "b", "c", "c"], ["pool", "pool", "prune", "prune"]
    assert rd.mutual_information(types, branches) == pytest.approx(rd.entropy_bits(branches)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one of each per cell"):
        rd.mutual_information(["a"], ["pool", "prune"])


def test_summary_of_a_hand_made_grid():
    # Two pictures (effect ±1) × two questions (effect ±3) on the first branch's logit; the second is 0.
    # Centred: first branch (p_i + q_j)/2, second -(p_i + q_j)/2 -> picture variance 0.25, question 2.25 per branch.
    p, q = np.array([1.0, -1.0]), np.array([3.0, -3.0])
    first = p[:, None] + q[None, :]  # (P, Q)
    logits = np.stack([first, np.zeros_like(first)], axis=-1)  # (2, 2, 2)
    weights = np.stack([first > 0, first <= 0], axis=-1).astype(float)  # top-1: question 0 -> pooling, 1 -> pruning
    probs = np.where(weights > 0, 0.995, 0.005)
    probs[0, 0] = [0.9, 0.1]  # one of the four cells is not saturated
    grid = rd.RouterGrid(logits=logits, probs=probs, weights=weights)
    d = rd.summarize_router_grid(grid, ["global", "local"], ["pooling", "pruning"], top_k=1, eval_temperature=0.1)
    assert d.variance["picture"]["pooling"] == pytest.approx(0.25)
    assert d.variance["question"]["pruning"] == pytest.approx(2.25)
    assert d.variance["interaction"]["pooling"] == pytest.approx(0.0)
    assert d.question_share == pytest.approx(0.9) and d.picture_share == pytest.approx(0.1)
    assert d.question_flip_rate == 1.0 and d.picture_flip_rate == 0.0
    assert d.saturated_share == 0.75 and d.saturated_share_per_type == {"global": 0.5, "local": 1.0}
    assert d.routed_share_per_type == {"global": {"pooling": 1.0, "pruning": 0.0}, "local": {"pooling": 0.0, "pruning": 1.0}}
    assert d.dominant_branch_per_type == {"global": "pooling", "local": "pruning"} and d.dominant_branch_differs
    assert d.mutual_information_bits == pytest.approx(1.0) and d.normalized_mutual_information == pytest.approx(1.0)
    data = json.loads(json.dumps(d.to_dict()))
    assert "grid" not in data and data["question_share"] == pytest.approx(0.9)
    assert "| global | 1 | 1.00 / 0.00 | 1.00 / 0.00 | pooling (1.00) | 50.0% |" in d.to_markdown()


def test_flip_rate_counts_pairs_of_distinct_positions():
    # One picture, three questions selecting sets A, A, B: ordered pairs that differ are 4 of 6.
    assert rd.flip_rate(np.array([[1, 1, 2]]), axis=1) == pytest.approx(4 / 6)
    assert rd.flip_rate(np.array([[1, 1, 2]]), axis=0) is None


def test_questions_are_stratified_by_type():
    rows = [(f"img{k % 3}.png", f"question {k}", "local" if k < 8 else ("global" if k < 10 else "all")) for k in range(11)]
    pictures_, questions, types = rd.select_grid(rows, num_pictures=2, num_questions=3, seed=0)
    assert len(pictures_) == 2 and sorted(types) == ["all", "global", "local"]
    with pytest.raises(rd.DataError, match="every type must be represented"):
        rd.select_grid(rows, num_questions=2)


# ===================================================================================== data and command line
def write_llava_data(folder, missing_picture=False):
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        make_image(width=48, height=48, seed=k).save(images / f"{k}.png")
    samples = []
    for k in range(3):
        for question, kind in zip(QUESTIONS[:4], TYPES[:4]):
            samples.append({
                "id": f"{k}-{kind}",
                "image": f"{k}.png",
                "dimension": kind,
                "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "x"}],
            })
    samples.append({"image": "0.png", "conversations": [{"from": "human", "value": "<image>\nno type here?"}]})
    samples.append({"conversations": [{"from": "human", "value": "text only"}]})  # no image: skipped
    if missing_picture:
        samples.append({"image": "absent.png", "conversations": [{"from": "human", "value": "<image>\nq"}]})
    data = folder / "data.json"
    data.write_text(json.dumps(samples))
    return str(data), str(images)


def test_cli_end_to_end(tiny_checkpoint, tmp_path, capsys):
    data, images = write_llava_data(tmp_path)
    output, markdown = tmp_path / "out" / "diagnosis.json", tmp_path / "out" / "diagnosis.md"
    argv = ["--model", tiny_checkpoint, "--data", data, "--image-folder", images, "--pictures", "2",
            "--output", str(output), "--markdown", str(markdown), "--quiet"]
    assert rd.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(output.read_text())
    assert (result["num_pictures"], result["num_questions"]) == (2, 5)
    assert result["questions_per_type"] == {"all": 1, "counting": 1, "global": 2, "local": 1}
    assert result["metadata"]["model_code"] == "checkpoint" and len(result["metadata"]["questions"]) == 5
    assert set(result["routed_share_per_type"]) == {"all", "counting", "global", "local"}
    assert 0.0 <= result["question_share"] <= 1.0 and result["top_k"] == 2
    assert markdown.read_text() in printed and "Router diagnostic" in printed
    assert not [name for name in os.listdir(output.parent) if name.startswith(".")]  # no temporary files left


def test_cli_rejects_bad_arguments_before_loading_anything(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(rd, "load_model_and_processor", no_loading)
    data, images = write_llava_data(tmp_path)
    _, broken_images = write_llava_data(tmp_path / "other", missing_picture=True)
    broken_data = str(tmp_path / "other" / "data.json")
    base = ["--model", tiny_checkpoint, "--data", data, "--image-folder", images]
    cases = [
        (["--model", str(tmp_path), "--data", data, "--image-folder", images], "not a checkpoint folder"),
        (["--model", str(tmp_path / "nowhere" / "x" / "y"), "--data", data, "--image-folder", images], "no such folder"),
        (["--model", tiny_checkpoint, "--data", str(tmp_path / "none.json"), "--image-folder", images], "no such file"),
        (["--model", tiny_checkpoint, "--data", data, "--image-folder", str(tmp_path / "none")], "no such folder"),
        (base + ["--pictures", "0"], "--pictures must be >= 1"),
        (base + ["--questions", "-2"], "--questions must be >= 1"),
        (base + ["--output", str(tmp_path)], "is a folder"),
        (base + ["--questions", "2"], "every type must be represented"),
        (["--model", tiny_checkpoint, "--data", broken_data, "--image-folder", broken_images], "not found"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            rd.main(argv + ["--quiet"])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_checkpoint_with_older_code_is_loaded_into_the_current_code(tiny_checkpoint, tmp_path):
    # A copy whose modeling_qmop.py has no `QueryGuidedRouter.logits`, like checkpoints written before it existed.
    old = str(tmp_path / "qmop-tiny-old-code")
    shutil.copytree(tiny_checkpoint, old)
    path = os.path.join(old, "modeling_qmop.py")
    with open(path) as f:
        code = f.read()
    with open(path, "w") as f:
        f.write(code.replace("def logits(", "def _older_logits(").replace("self.logits(", "self._older_logits("))
    data, images = write_llava_data(tmp_path)
    new = rd.diagnose_from_data(tiny_checkpoint, data, images, num_pictures=2, disable_tqdm=True)
    older = rd.diagnose_from_data(old, data, images, num_pictures=2, disable_tqdm=True)
    assert (new.metadata["model_code"], older.metadata["model_code"]) == ("checkpoint", "repository")
    np.testing.assert_allclose(older.grid.logits, new.grid.logits, atol=1e-6)
    np.testing.assert_array_equal(older.grid.weights > 0, new.grid.weights > 0)
