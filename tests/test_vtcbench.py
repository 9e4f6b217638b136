"""Mini VTCBench: the data generator, the exact feature cache, the pictures, the whole pipeline in miniature, and the
committed tiny checkpoint's accuracy on a fixed test slice."""

import json
import os

import numpy
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, Terminal, as_stderr, make_image

from qmop_tools.vtcbench.data import (ANSWERS, DIMENSIONS, GLYPHS, GRID, IMAGE_SIZE, KINDS, NUMBERS, PATCH_SIZE,
                                      _tag_box, draw_labels, draw_scene, generate_split, write_dataset)
from qmop_tools.vtcbench.experiment import FeatureCache, Settings, normalise_answer

BUNDLED = os.path.join(REPO_ROOT, "checkpoints", "qmop-tiny")


def test_scenes_are_deterministic_per_seed_and_split():
    a, b = generate_split("test", 6, seed=3), generate_split("test", 6, seed=3)
    assert [s.caption() for s in a] == [s.caption() for s in b]
    assert draw_scene(a[0]).tobytes() == draw_scene(b[0]).tobytes()
    assert [s.caption() for s in a] != [s.caption() for s in generate_split("train", 6, seed=3)]
    assert [s.caption() for s in a] != [s.caption() for s in generate_split("test", 6, seed=4)]
    # a prefix of a split does not depend on the split's size (the accuracy test relies on it)
    assert [s.caption() for s in generate_split("test", 3, seed=3)] == [s.caption() for s in a[:3]]


def test_every_scene_asks_one_question_per_dimension_with_a_known_answer():
    for scene in generate_split("train", 30, seed=0):
        assert [q["dimension"] for q in scene.questions] == list(DIMENSIONS)
        for q in scene.questions:
            assert q["answer"] in ANSWERS[q["dimension"]], q
        assert 1 <= len(scene.shapes) <= 4
        answers = {q["dimension"]: q["answer"] for q in scene.questions}
        assert answers["global"] == scene.background and answers["style"] == scene.texture
        assert answers["local"] == scene.tag_letter
        assert answers["counting"] == NUMBERS[len(scene.shapes) - 1]
        assert answers["spatial"] in scene.tag_corner.split()  # the tag's half, on the question's axis
        x, y = scene.cross  # still drawn, clearly in one half
        assert abs(x - 72) >= 14 and abs(y - 72) >= 14
    spatial = [q for scene in generate_split("val", 40, seed=0) for q in scene.questions if q["dimension"] == "spatial"]
    assert {q["answer"] for q in spatial} == {"left", "right", "top", "bottom"}
    box_x, box_y, width, height = _tag_box(scene)
    horizontal, vertical = scene.tag_sides
    assert (box_x + width / 2 < 72) == (horizontal == "left") and (box_y + height / 2 < 72) == (vertical == "top")
    image = draw_scene(generate_split("val", 1)[0])
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and IMAGE_SIZE // PATCH_SIZE == 24


def test_label_map_names_what_covers_each_patch():
    scene = generate_split("train", 1, seed=0)[0]
    labels = draw_labels(scene)
    kinds = torch.tensor(labels["kind"])
    assert kinds.shape == (GRID, GRID)
    assert (kinds == KINDS.index("tag")).sum() >= 4 and (kinds == KINDS.index("cross")).sum() >= 1
    assert (kinds == KINDS.index("shape")).sum() >= len(scene.shapes)
    letters = torch.tensor(labels["letter"])
    assert set(letters[kinds == KINDS.index("tag")].tolist()) == {list(GLYPHS).index(scene.tag_letter)}
    assert (letters[kinds != KINDS.index("tag")] == -1).all()
    # the tag patches are where the tag is drawn: in the named corner
    rows, cols = torch.nonzero(kinds == KINDS.index("tag"), as_tuple=True)
    assert (rows.float().mean() < GRID / 2) == ("top" in scene.tag_corner)
    assert (cols.float().mean() < GRID / 2) == ("left" in scene.tag_corner)
    assert labels["row"][5][7] == 5 and labels["column"][5][7] == 7
    # one centre patch per shape (what a count is read from), each on the shape
    centres = torch.tensor(labels["centre"])
    assert int(centres.sum()) == len(scene.shapes) and set(centres.flatten().tolist()) == {0, 1}
    for shape in scene.shapes:
        assert centres[shape.y // PATCH_SIZE, shape.x // PATCH_SIZE] == 1
    assert (kinds[centres == 1] == KINDS.index("shape")).all()


def test_pair_layout_puts_tag_and_decoy_in_one_pooling_cell():
    """Layout "pair": the tag and a decoy with another letter share the corner's 24 x 24 pooling cell at M = 36, meet
    on a patch border (each patch shows one box), and the label maps name each box's own letter and tell them apart;
    layout "tag" is version 6 as before."""
    from qmop_tools.vtcbench.data import DECOY_COLOUR, _decoy_box, data_version, dataset_marker, kinds, make_scene
    from qmop_tools.vtcbench.towers import dense_heads, picture_heads

    cell = 24  # IMAGE_SIZE / sqrt(36)
    scenes = generate_split("train", 40, seed=0, layout="pair")
    assert {s.decoy_side for s in scenes} == {"left", "right"}
    for scene in scenes:
        assert scene.decoy_letter in GLYPHS and scene.decoy_letter != scene.tag_letter
        assert f"the letter {scene.decoy_letter} on a grey box" in scene.caption()
        tag, decoy = _tag_box(scene), _decoy_box(scene)
        assert tag[1:] == decoy[1:] and abs(tag[0] - decoy[0]) == tag[2]  # side by side, one row
        left, top = min(tag[0], decoy[0]), tag[1]
        assert left // cell == (left + 2 * tag[2] - 1) // cell and top // cell == (top + tag[3] - 1) // cell
        assert max(tag[0], decoy[0]) % PATCH_SIZE == 0  # they meet on a patch border
        assert (tag[0] < decoy[0]) == (scene.decoy_side == "right")
        labels = draw_labels(scene)
        kind, letter = torch.tensor(labels["kind"]), torch.tensor(labels["letter"])
        assert set(letter[kind == KINDS.index("tag")].tolist()) == {list(GLYPHS).index(scene.tag_letter)}
        assert set(letter[kind == KINDS.index("decoy")].tolist()) == {list(GLYPHS).index(scene.decoy_letter)}
        assert (kind == KINDS.index("decoy")).sum() >= 4
        # what the picture shows where the tag is: the tag's colour, not the decoy's grey
        image = draw_scene(scene)  # a box's first pixel is its margin, never ink
        assert image.getpixel(tag[:2]) != image.getpixel(decoy[:2]) == DECOY_COLOUR
    # "tag" draws exactly what it drew before layouts existed: no decoy, no extra random draws
    plain = generate_split("train", 5, seed=0)
    assert [s.caption() for s in plain] == [s.caption() for s in generate_split("train", 5, seed=0, layout="tag")]
    assert all(s.decoy_letter == "" and "grey box" not in s.caption() for s in plain)
    assert all((torch.tensor(draw_labels(s)["kind"]) < 4).all() for s in plain)
    assert data_version("tag") == dataset_marker(0, {})["version"] != data_version("pair")
    assert kinds("tag") == KINDS[:4] and dense_heads("pair")["kind"] == 5 == dense_heads("tag")["kind"] + 1
    assert "letter" in picture_heads("tag") and "letter" not in picture_heads("pair")
    with pytest.raises(ValueError, match="Unknown data layout"):
        make_scene(__import__("random").Random(0), "pairs")


def test_ink_labels_give_each_glyph_patch_its_stroke_pattern():
    """`glyph_target="ink"`: the glyph head names which quadrants of a patch are ink, not the letter; the heads and
    the keys follow (docs/vtcbench.md, "Data layout pair")."""
    from qmop_tools.vtcbench.data import GLYPHS, INK_CODES, ink_labels
    from qmop_tools.vtcbench.towers import dense_heads, foundation_recipe, picture_heads

    scene = generate_split("train", 1, seed=0, layout="pair")[0]
    kind = draw_labels(scene)["kind"]
    codes = torch.tensor(ink_labels(scene, kind))
    glyph = torch.isin(torch.tensor(kind), torch.tensor([KINDS.index("tag"), KINDS.index("decoy")]))
    assert (codes[~glyph] == -1).all() and ((codes[glyph] >= 0) & (codes[glyph] < INK_CODES)).all()
    assert len(set(codes[glyph].tolist())) >= 3  # strokes differ from patch to patch
    # the same letters drawn elsewhere in the box give other codes: the target is where the ink is, not which letter
    box = _tag_box(scene)
    pixels = numpy.asarray(draw_scene(scene)).astype(int)
    row, col = box[1] // PATCH_SIZE, box[0] // PATCH_SIZE
    quadrant = pixels[row * PATCH_SIZE:row * PATCH_SIZE + 3, col * PATCH_SIZE:col * PATCH_SIZE + 3]
    ink = (0, 0, 0) if tuple(pixels[box[1], box[0]]) != (0, 0, 0) else (255, 255, 255)
    assert bool(codes[row, col] & 1) == ((quadrant == ink).all(-1).sum() >= 5)
    # a scene whose tag shows another letter keeps its kinds but changes its ink map
    other = generate_split("train", 1, seed=0, layout="pair")[0]
    other.tag_letter = next(g for g in GLYPHS if g not in (scene.tag_letter, scene.decoy_letter))
    assert ink_labels(other, kind) != ink_labels(scene, kind)
    heads = dense_heads("pair", "ink")
    assert heads["ink"] == INK_CODES and "letter" not in heads and "letter" in dense_heads("pair")
    assert "letter" not in picture_heads("tag", "ink") and "letter" in picture_heads("tag")
    assert foundation_recipe("letter") != foundation_recipe("ink")
    default = Settings().job_key("pooling")
    ink = Settings(glyph_target="ink").job_key("pooling")
    assert "glyph_target" not in default and ink["foundation"] == foundation_recipe("ink") != default["foundation"]
    from qmop_tools.vtcbench.cli import parse
    from qmop_tools.vtcbench.towers import pretrain_clip

    assert parse(["--glyph-target", "ink"])[1].glyph_target == "ink"
    with pytest.raises(ValueError, match="glyph target"):
        pretrain_clip(None, "", [{"decoy_letter": ""}], None, steps=1, glyph_target="strokes")


def test_data_layout_setting_keys_the_runs():
    from qmop_tools.vtcbench.cli import parse

    _, settings = parse(["--data-layout", "tag"])
    assert settings.data_layout == "tag" and settings.job_key("pooling")["data_version"] == 6
    assert "data_layout" not in settings.job_key("pooling")  # runs from before the setting stay valid
    assert Settings().data_layout == "pair" and Settings().job_key("pooling")["data_version"] == "6-pair"
    with pytest.raises(SystemExit):
        parse(["--data-layout", "pairs"])


def test_epoch_settings_key_the_runs_they_change():
    from qmop_tools.vtcbench.cli import parse

    _, settings = parse(["--budgets-stage2-epochs", "6"])
    assert settings.job_key("qmop_outcome_all_budgets")["stage2_epochs"] == 6
    assert settings.job_key("qmop_outcome_all") == Settings().job_key("qmop_outcome_all")  # fixed-budget runs reused
    assert "budgets_stage2_epochs" not in settings.job_key("qmop_outcome_all_budgets")  # older keys stay valid
    with pytest.raises(SystemExit):
        parse(["--budgets-stage2-epochs", "0"])
    _, settings = parse(["--stage1-epochs", "4"])
    assert all(settings.job_key(v)["stage1_epochs"] == 4 for v in ("pooling", "qmop_outcome_all_budgets"))
    with pytest.raises(SystemExit):
        parse(["--stage1-epochs", "-1"])
    assert Settings().job_key("uniform")["stage2_lr"] == 1e-3  # the default since the acceptance rerun at 1e-3
    _, settings = parse(["--stage2-lr", "2e-3"])  # the runs before it
    assert settings.job_key("uniform")["stage2_lr"] == 2e-3 and settings.job_key("uniform")["stage1_lr"] == 2e-3
    assert settings.job_key("uniform") != Settings().job_key("uniform")
    with pytest.raises(SystemExit):
        parse(["--stage2-lr", "0"])


def test_every_shape_covers_the_same_area():
    """A count is an area: each of the four shapes on a plain picture covers the circle's pixels within 20% (the
    rounding of 16-pixel-wide polygons to pixels; before data version 6 a triangle covered 57% of the circle)."""
    from qmop_tools.vtcbench.data import BACKGROUNDS, SHAPES, Scene, Shape

    areas = {}
    for name in SHAPES:
        scene = Scene("white", "plain", [Shape(name, "red", 72, 72)], (20, 72), "top left", "e", "blue")
        window = draw_scene(scene).crop((52, 52, 93, 93))  # the shape alone: the cross and tag are far away
        pixels = torch.tensor(numpy.asarray(window))  # (41, 41, 3)
        background = torch.tensor(BACKGROUNDS["white"], dtype=torch.uint8)
        areas[name] = int((pixels != background).any(-1).sum())  # fill and outline
    assert max(areas.values()) <= 1.2 * min(areas.values()), areas


def test_write_dataset_writes_llava_files_and_rejects_bad_sizes(tmp_path):
    write_dataset(str(tmp_path / "data"), {"train": 3, "test": 2}, seed=0)
    vqa = json.load(open(tmp_path / "data" / "train_vqa.json"))
    captions = json.load(open(tmp_path / "data" / "train_captions.json"))
    assert len(vqa) == 15 and len(captions) == 3
    assert vqa[0]["conversations"][0]["value"].startswith("<image>\n")
    assert os.path.exists(tmp_path / "data" / "images" / vqa[0]["image"])
    with pytest.raises(ValueError, match="num_images"):
        write_dataset(str(tmp_path / "bad"), {"train": 0})
    with pytest.raises(ValueError, match="Unknown split"):
        generate_split("dev", 2)
    assert not os.path.exists(tmp_path / "bad")


def test_stage2_weights_repeat_a_dimensions_questions(tmp_path):
    from qmop_tools.vtcbench.experiment import weighted_vqa

    write_dataset(str(tmp_path / "data"), {"train": 4}, seed=0)
    source = str(tmp_path / "data" / "train_vqa.json")
    assert weighted_vqa(str(tmp_path / "data"), "") == source
    assert weighted_vqa(str(tmp_path / "data"), "counting=1") == source
    path = weighted_vqa(str(tmp_path / "data"), "counting=3,local=2")
    assert path.endswith("train_vqa-countingx3-localx2.json")
    plain, weighted = json.load(open(source)), json.load(open(path))
    count = lambda samples, dimension: sum(s["dimension"] == dimension for s in samples)
    assert (count(weighted, "counting"), count(weighted, "local"), count(weighted, "global")) == (12, 8, 4)
    assert len(weighted) == len(plain) + 4 * 2 + 4 and {s["id"] for s in weighted} == {s["id"] for s in plain}
    with pytest.raises(ValueError, match="colour"):
        weighted_vqa(str(tmp_path / "data"), "colour=2")


def test_normalise_answer():
    assert normalise_answer(" Red.") == "red"
    assert normalise_answer(" two triangles") == "two"
    assert normalise_answer("") == ""


def test_feature_cache_is_exact():
    from qmop_tools.testing.tiny import build_tiny

    model, processor = build_tiny()  # its own model: the cache patches the instance
    inputs = processor(images=[make_image(seed=0), make_image(seed=1)], text=["<image>\nwhat?", "<image>\nwhy?"],
                       return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs)
        cache = FeatureCache()
        cache.install(model)
        first = model(**inputs)
        second = model(**inputs)
    assert cache.misses == 2 and cache.hits == 2
    torch.testing.assert_close(first.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(second.logits, reference.logits, rtol=0, atol=0)
    assert torch.equal(second.router_weights, reference.router_weights)
    # a model with another vision tower does not get these features
    other, _ = build_tiny(seed=1)
    with torch.no_grad():
        expected = other(**inputs).logits
        cache.install(other)
        assert torch.equal(other(**inputs).logits, expected)
    assert cache.misses == 4
    # a tower that prunes by the question: its output is not a function of the picture, so no cache
    pruned, pruned_processor = build_tiny(num_visual_tokens=4, tower_pruning_schedule="qg_vtc")
    assert cache.install(pruned) is False
    with torch.no_grad():
        pruned(**pruned_processor(images=[make_image(seed=0)], text=["<image>\nwhat?"], return_tensors="pt"))
    assert cache.misses == 4 and cache.hits == 2


def test_analysis_picture_shows_kept_patches_and_router(tiny):
    from qmop_tools.vtcbench.visualize import analyse, contact_sheet, render_analysis

    model, processor = tiny
    result = analyse(model, processor, make_image(seed=0), "what colour is the circle?", max_new_tokens=2)
    grid = model.config.patch_grid
    assert len(result["kept_patches"]) == result["visual_tokens"] == model.config.num_visual_tokens
    assert all(0 <= i < grid * grid for i in result["kept_patches"])
    assert abs(sum(result["router_weights"].values()) - 1) < 1e-5
    picture = render_analysis(result)
    assert picture.height >= 3 * result["image"].height and picture.width > picture.height
    # a kept patch keeps its pixels, a dropped one is dimmed
    side = grid * round(result["image"].width * 3 / grid)
    patch = side // grid
    big = result["image"].resize((side, side), Image.NEAREST)
    dropped = next(i for i in range(grid * grid) if i not in result["kept_patches"])
    for index, kept in ((result["kept_patches"][0], True), (dropped, False)):
        row, col = divmod(index, grid)
        centre = (col * patch + patch // 2, row * patch + patch // 2)
        original, drawn = big.getpixel(centre), picture.getpixel(centre)
        if kept:
            assert drawn == original
        else:
            assert all(abs(d - 128) <= abs(o - 128) for d, o in zip(drawn, original)) and drawn != original
    sheet = contact_sheet([picture, picture, picture], columns=2)
    assert sheet.size == (2 * picture.width, 2 * picture.height)


def test_command_line_rejects_bad_settings(capsys):
    from qmop_tools.vtcbench.cli import main

    for argv, message in ((["--budget", "40"], "perfect square"), (["--workers", "0"], "--workers"),
                          (["--variants", "pooling", "--export-checkpoint", "x"], "qmop"),
                          (["--stage2-weights", "colour=2"], "unknown dimensions ['colour']"),
                          (["--stage2-weights", "counting=0"], "counting=0"),
                          (["--stage2-weights", "counting"], "dimension=N")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_smoke_pipeline_end_to_end(tmp_path, monkeypatch, capfd):
    from qmop_tools.vtcbench.cli import main

    output, checkpoint = tmp_path / "vtc", tmp_path / "ckpt"
    summary = main(["--smoke", "--output", str(output), "--export-checkpoint", str(checkpoint)])
    table = open(output / "results.md").read()
    assert "| QMoP (query-guided router) | 36 |" in table
    header = next(line for line in table.splitlines() if line.startswith("| variant"))
    assert [c.strip() for c in header.strip("|").split("|")][2:8] == ["overall", *DIMENSIONS]
    assert "mean router weight per question dimension" in table
    for path in (output / "results.png", output / "pictures.png", output / "results.json"):
        assert os.path.getsize(path) > 1000
    assert set(summary["table"]) == {"qmop", "downsample", "qmop_outcome_all_budgets", "qg_vtc"}
    assert "| QG-VTC tower pruning (72 kept) + pooling | 36 |" in table
    assert "| image downsampled to 36 patches | 36 |" in table
    assert "## Acceptance checks" in table and "Router diagnostic on test pictures" in table
    assert "Reader probe" in table and "| pool36 (36 tokens) | all | 0.002 | 3 |" in table  # after the foundation
    for budget in (16, 36, 64, 144):
        assert (f"| QMoP, router trained by outcome through every branch, one checkpoint for budgets 16/36/64/144 "
                f"(seed 0) | {budget} |") in table
    small = Image.open(output / "data" / "images_downsampled" / "test" / "00000.png")
    colours = numpy.unique(numpy.asarray(small).reshape(-1, 3), axis=0)
    assert small.size == (IMAGE_SIZE, IMAGE_SIZE) and len(colours) <= 36 * 36  # 36 x 36 px of content
    results = json.load(open(output / "results.json"))
    run = next(r for r in results["runs"] if r["variant"] == "qmop")
    assert run["stage1"]["steps"] > 0 and run["stage2"]["steps"] > 0
    assert run["evaluation"]["test"]["count"] == 50 and "val" in run["evaluation"]
    assert run["feature_cache"]["hits"] > 0  # the frozen tower ran once per image, not once per step
    assert 0.0 <= run["router_diagnostics"]["question_share"] <= 1.0
    # every routed run is also scored with each branch forced, and the report sets them beside its router
    assert set(run["forced_branches"]) == {"pooling", "resampler", "pruning"}
    assert set(run["forced_branches"]["pruning"]["per_dimension"]) == set(DIMENSIONS)
    assert "| QMoP (query-guided router) | pruning forced |" in table and "| oracle by type |" in table
    budgets = next(r for r in results["runs"] if r["variant"] == "qmop_outcome_all_budgets")
    assert {"test@16", "test", "test@64", "test@144", "val"} <= set(budgets["evaluation"])
    # the exported checkpoint loads as a Hub user loads it, with its card
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint), trust_remote_code=True)
    assert model.config.num_visual_tokens == 36 and model.config.patch_grid == 24
    # the exported run is the budget-sampled QMoP whose router is trained by outcome through every branch
    assert model.config.router_training == "outcome" and model.config.router_outcome_branches == "all"
    assert "qmop-tiny" in open(checkpoint / "README.md").read()
    # the offline router study on that run's model: its targets, fresh routers of both input norms, their routing
    from qmop_tools.vtcbench.router_offline import main as router_offline

    study = router_offline(["--model", str(output / "runs" / "qmop_outcome_all_budgets-s0" / "model"), "--data",
                            str(output / "data"), "--output", str(tmp_path / "offline.json"), "--seeds", "0", "1",
                            "--epochs", "0.5", "--limit", "20"])
    assert json.load(open(tmp_path / "offline.json")) == study
    assert set(study["routers"]) == {"query/layer", "query/standardize", "vision/layer", "vision/standardize"}
    assert len(study["routers"]["query/layer"]["runs"]) == 2
    assert set(study["forced"]) == {"pooling", "resampler", "pruning"}
    for summary in (study["oracle_per_type"], *study["routers"]["query/standardize"]["runs"]):
        assert all(sum(shares.values()) == pytest.approx(1.0, abs=2e-3) for shares in summary["routed"].values())
    assert study["oracle_per_type"]["overall"] >= max(f["overall"] for f in study["forced"].values())
    # a second run reuses everything already on disk: no run, foundation part or dataset is written again
    written = {path: os.path.getmtime(path) for path in
               [*output.glob("runs/*/result.json"), *output.glob("foundation/report-*.json"), output / "data" / "dataset.json",
                output / "probes" / "reader-pool36.json"]}
    # ...and shows its stages and runs on a terminal, and nothing of them under --quiet (tests/test_progress.py)
    terminal = as_stderr(monkeypatch, Terminal())
    main(["--smoke", "--output", str(output)])
    assert written and all(os.path.getmtime(path) == mtime for path, mtime in written.items())
    assert "mini VTCBench: 100%" in terminal.getvalue() and "5/5" in terminal.getvalue()
    jobs = len(Settings.smoke().jobs())
    assert "runs: 100%" in terminal.getvalue() and f"{jobs}/{jobs}" in terminal.getvalue()
    terminal.seek(0), terminal.truncate()
    main(["--smoke", "--output", str(output), "--quiet"])
    assert terminal.getvalue() == ""
    # ...also from worker processes, which start with nothing of the parent's set-up: two runs trained again by two
    # spawned workers print no bar (transformers' "Writing model shards"...), no log line and no trainer log
    for name in ("qmop-s0", "downsample-s0"):
        (output / "runs" / name / "result.json").unlink()
    capfd.readouterr()
    main(["--smoke", "--output", str(output), "--quiet", "--workers", "2"])
    printed = capfd.readouterr()
    assert all(os.path.exists(output / "runs" / name / "result.json") for name in ("qmop-s0", "downsample-s0"))
    assert terminal.getvalue() == "" and "it/s]" not in printed.err, printed.err[-2000:]
    assert "qmop-s0 done in" not in printed.err + printed.out  # the workers' info lines
    assert "train metrics" not in printed.out and "'loss'" not in printed.out, printed.out[:2000]
    assert "| variant" in printed.out  # the results table, as always

    # the reader probe trains on the same data and foundation, with 36 pooled or all 576 tokens per picture
    from qmop_tools.vtcbench.reader_probe import ProbeSettings, run_probe
    from qmop_tools.vtcbench.report import reader_probe_table

    for tokens, count in (("pool36", 36), ("full", 576)):
        probe = run_probe(str(output), ProbeSettings(tokens=tokens, steps=3, batch_size=8, eval_every=2))
        assert probe["tokens_per_picture"] == count and [point["step"] for point in probe["curve"]] == [2, 3]
        assert set(probe["curve"][-1]["val_accuracy"]) == set(DIMENSIONS)
        assert json.load(open(output / "probes" / f"reader-{tokens}.json"))["curve"] == probe["curve"]
    cached = output / "foundation" / "clip" / "tokens-train.pt"
    mtime = os.path.getmtime(cached)
    run_probe(str(output), ProbeSettings(steps=1))
    assert os.path.getmtime(cached) == mtime  # the tower's tokens are computed once
    # one dimension alone: its own report file, scored on that dimension only, shown next to the others
    alone = run_probe(str(output), ProbeSettings(steps=2, batch_size=8, eval_every=2, dimensions="spatial"))
    assert set(alone["curve"][-1]["val_accuracy"]) == {"spatial"}
    assert (output / "probes" / "reader-pool36-spatial.json").exists()
    # a weighted schedule draws a dimension's questions that many times more often; its own report file
    weighted = run_probe(str(output), ProbeSettings(steps=2, batch_size=8, eval_every=2, weights="counting=3"))
    assert set(weighted["curve"][-1]["val_accuracy"]) == set(DIMENSIONS)
    assert (output / "probes" / "reader-pool36-countingx3.json").exists()
    # another seed: its own file next to seed 0's, not written over it
    run_probe(str(output), ProbeSettings(steps=2, batch_size=8, eval_every=2, weights="counting=3", seed=1))
    assert (output / "probes" / "reader-pool36-countingx3-s1.json").exists()
    table = reader_probe_table(str(output))
    assert "| pool36 (36 tokens) | spatial |" in table and "| pool36 (36 tokens) | all |" in table
    assert "| pool36 (36 tokens) | all, weighted counting=3 |" in table
    assert "| pool36 (36 tokens) | all, weighted counting=3, seed 1 |" in table
    with pytest.raises(ValueError, match="tokens"):
        ProbeSettings(tokens="pool16")
    with pytest.raises(ValueError, match="dimensions"):
        ProbeSettings(dimensions="spatial,colour")
    with pytest.raises(ValueError, match="dimensions"):
        ProbeSettings(weights="colour=2")


def test_bundled_checkpoint_accuracy_on_a_fixed_test_slice(tmp_path):
    """The committed tiny checkpoint answers the first 40 test images' 200 questions at least as well as the table
    says, minus a small margin (recomputed here from scratch: data, processor, generate)."""
    from qmop_tools.vtcbench.experiment import evaluate
    from qmop_tools.vtcbench.report import SLICE_IMAGES, exported_layout

    assert os.path.exists(os.path.join(BUNDLED, "config.json")), "checkpoints/qmop-tiny is missing"
    recorded = json.load(open(os.path.join(BUNDLED, "vtcbench_results.json")))["best_qmop"]
    write_dataset(str(tmp_path / "data"), {"test": SLICE_IMAGES}, seed=0, layout=exported_layout(BUNDLED))
    result = evaluate(BUNDLED, str(tmp_path / "data"), "test")
    assert result["count"] == SLICE_IMAGES * 5
    assert result["overall"] >= recorded["test"] - 0.05, (result["overall"], recorded)
    assert abs(result["overall"] - recorded["test_slice"]) <= 0.02, (result["overall"], recorded)


def test_demo_answers_the_bundled_questions(tmp_path):
    """The README's main command on the bundled image: the answers recorded at export, and the picture is written."""
    import subprocess
    import sys

    picture = tmp_path / "demo.png"
    result = subprocess.run([sys.executable, "-m", "qmop_tools", "demo", "--picture", str(picture)],
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    spec = json.load(open(os.path.join(REPO_ROOT, "assets", "demo.json")))
    answers = [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("answer:")]
    # the demo reproduces the answers the bundled run gave at export; which of them are right is recorded there
    assert [normalise_answer(a) for a in answers] == spec["model_answers"], result.stdout
    assert spec["correct"] == [m == a for m, a in zip(spec["model_answers"], spec["answers"])]
    assert Image.open(picture).width > 400


def test_tower_class_weights_and_balanced_accuracy():
    from qmop_tools.vtcbench.towers import balanced_accuracy, inverse_frequency

    targets = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 2]])  # class 0: 13, class 1: 2, class 2: 1
    weights = inverse_frequency(torch.cat([targets, torch.full((2, 3), -1)], 1), 3)  # -1 (not applicable) ignored
    assert torch.allclose(weights * torch.tensor([13.0, 2.0, 1.0]), torch.full((3,), 16 / 3))  # each class weighs 16/3
    # predicting the majority everywhere is 81% plain accuracy but a third balanced
    majority = torch.zeros(16, dtype=torch.long)
    assert balanced_accuracy(majority, targets.flatten()) == pytest.approx(1 / 3)
    assert balanced_accuracy(targets.flatten(), targets.flatten()) == 1.0


def test_findings_compare_each_method_and_state_the_per_type_ceiling():
    from qmop_tools.vtcbench.report import DIMENSIONS, findings

    def row(scores):  # (mean, std) per dimension and overall
        out = {d: (s, 0.01) for d, s in zip(DIMENSIONS, scores)}
        out["overall"] = (sum(scores) / len(scores), 0.01)
        return out

    table = {"qmop": row([0.7] * 5), "pooling": row([1.0, 0.7, 0.8, 0.3, 1.0]),
             "resampler": row([0.9, 0.5, 0.6, 0.3, 0.9]), "pruning": row([0.5, 0.8, 0.8, 0.5, 0.9]),
             "llm_pruning": row([0.9, 0.6, 0.8, 0.3, 1.0]), "learned_pruner": row([0.5, 0.9, 0.8, 0.5, 0.9])}
    lines = findings(table)
    ceiling = sum(max(t) for t in zip([1.0, 0.7, 0.8, 0.3, 1.0], [0.5, 0.8, 0.8, 0.5, 0.9])) / 5
    assert any(line.startswith(f"the best single branch per question type, averaged: {100 * ceiling:.1f}")
               for line in lines), lines
    assert any(line.startswith("pooling + mid-LLM pruning") and "vs pooling only" in line for line in lines)
    assert any(line.startswith("pruning only (LearnPruner") and "vs pruning only (salience)" in line for line in lines)


def test_forced_branch_table_sets_each_branch_beside_the_router_and_the_oracle():
    from qmop_tools.vtcbench.report import DIMENSIONS, findings, forced_branch_oracle, forced_branch_table

    scores = {"pooling": [1.0, 0.6, 0.8, 0.3, 1.0], "resampler": [0.9, 0.5, 0.9, 0.3, 0.9],
              "pruning": [0.4, 0.8, 0.7, 0.5, 0.8]}
    forced = {b: {"overall": sum(v) / 5, **dict(zip(DIMENSIONS, v))} for b, v in scores.items()}
    row = {d: (0.6, 0.0) for d in DIMENSIONS} | {"overall": (0.6, 0.0), "forced_branches": forced}
    oracle, best = forced_branch_oracle(row)
    assert best == {"global": "pooling", "local": "pruning", "spatial": "resampler", "counting": "pruning",
                    "style": "pooling"}
    assert oracle == pytest.approx((1.0 + 0.8 + 0.9 + 0.5 + 1.0) / 5)
    table = forced_branch_table({"qmop_outcome": row})
    assert "| QMoP, router trained by outcome (loss per branch) | pruning forced | 64.0 | 40.0 | 80.0 |" in table
    assert "| oracle by type | 84.0 | 100.0 (pooling) | 80.0 (pruning) | 90.0 (resampler) |" in table
    lines = findings({"qmop": row, "qmop_outcome": row})
    assert any("its best branch per question type 84.0" in line for line in lines), lines


def test_moe_table_sets_the_moe_runs_beside_the_dense_llm():
    from qmop_tools.vtcbench.report import DIMENSIONS, aggregate, moe_table

    def run(variant, seed, bits):
        routing = None if bits is None else {
            "mean_specialisation_bits": bits, "mean_cross_bin_share": 0.5,
            "layers": [{"specialisation_bits": bits, "visual_share_per_bin": [0.6, 0.4]}] * 2}
        return {"variant": variant, "seed": seed, "seconds": 1.0, "moe_routing": routing,
                "evaluation": {"test": {"overall": 0.7, "per_dimension": {d: 0.7 for d in DIMENSIONS}}}}

    table = aggregate([run("pooling", 0, None), run("pooling_moe", 0, 0.01), run("pooling_moe", 1, 0.03),
                       run("pooling_moe_smoes", 0, 0.2)])
    assert table["pooling_moe"]["moe_routing"]["specialisation_bits"][0] == pytest.approx(0.02)
    text = moe_table(table)
    lines = [line for line in text.splitlines() if line.startswith("| pooling")]
    assert [line.split(" | ")[0] for line in lines] == [
        "| pooling only (dense LLM)", "| pooling only, MoE LLM (upcycled, 4 experts)",
        "| pooling only, MoE LLM + SMoES (0.1)"]
    assert "0.200 ± 0.000" in lines[2] and "0.60 / 0.40" in lines[2]
    assert moe_table(aggregate([run("pooling", 0, None)])) == ""


def test_acceptance_judges_the_outcome_router_against_its_own_question_blind_twin():
    from qmop_tools.vtcbench.report import DIMENSIONS, acceptance, findings

    def row(overall, std=0.01):
        return {d: (overall, std) for d in DIMENSIONS} | {"overall": (overall, std)}

    table = {"qmop_outcome_all": row(0.75, 0.05), "vision_outcome_all": row(0.74), "pooling": row(0.79),
             "uniform": row(0.71)}
    checks = {check: met for check, met, _ in acceptance(table)}
    name = "QMoP (router trained by outcome, every branch per image)"
    assert checks[f"{name} >= the best single branch (pooling) overall"] is False
    assert checks[f"{name} above equal-weight fusion of all three by more than the larger std"] is False  # 4 < 5 points
    assert checks[f"{name} above router without the question, trained by outcome, every branch per image by more "
                  "than the larger std"] is False
    assert not any(check.startswith("QMoP >=") for check in checks)  # no mixture-trained QMoP run in this table
    assert any(line.startswith(name) and "vs the best single branch (pooling)" in line for line in findings(table))
    # the router with standardised inputs is judged against its own twin (and the LayerNorm one) when present
    table |= {"qmop_outcome_all_std": row(0.80), "vision_outcome_all_std": row(0.70)}
    checks = {check: met for check, met, _ in acceptance(table)}
    std = "QMoP (router trained by outcome through every branch, inputs standardised)"
    assert checks[f"{std} above router without the question, trained by outcome, every branch per image, inputs "
                  "standardised by more than the larger std"] is True
    assert checks[f"{std} above router without the question, trained by outcome, every branch per image by more "
                  "than the larger std"] is True


def test_acceptance_flag_runs_what_the_acceptance_checks_read():
    from qmop_tools.vtcbench.cli import parse
    from qmop_tools.vtcbench.experiment import ACCEPTANCE_VARIANTS, VARIANTS
    from qmop_tools.vtcbench.report import QMOP_RUNS

    _, settings = parse(["--acceptance"])
    assert settings.variants == list(ACCEPTANCE_VARIANTS) and settings.seeds == [0, 1, 2]
    assert set(ACCEPTANCE_VARIANTS) <= set(VARIANTS)
    assert set(QMOP_RUNS["qmop_outcome_all_std"]) - {"vision_router", "vision_outcome_all"} <= set(ACCEPTANCE_VARIANTS)
    assert {"qmop_outcome_all_std", "vision_outcome_all_std"} <= set(ACCEPTANCE_VARIANTS)  # the two routers, same norm
    for variant in ("qmop_outcome_all_std", "vision_outcome_all_std"):
        assert VARIANTS[variant]["router_input_norm"] == "standardize"
    for conflicting in (["--acceptance", "--smoke"], ["--acceptance", "--variants", "pooling"]):
        with pytest.raises(SystemExit):
            parse(conflicting)
