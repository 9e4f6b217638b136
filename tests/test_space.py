"""The Gradio Space: the export (layout, front matter, refusal to overwrite, temp-then-move), the budget helpers, the
command line, and the exported Space served by `python app.py` and driven in headless Debian chromium."""

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlsplit

import pytest
from conftest import REPO_ROOT

from qmop_tools import space
from qmop_tools.space import SPACE_FILES, export_space, snap_budget, valid_budgets

BUNDLED = os.path.join(REPO_ROOT, "checkpoints", "qmop-tiny")
NO_GRADIO = ("gradio is not installed (requirements/space.txt, in .venv only: gradio 6 needs huggingface_hub>=1.16, "
             "which transformers 4.57 refuses)")
with open(os.path.join(REPO_ROOT, "assets", "demo.json")) as f:
    DEMO = json.load(f)


def front_matter(readme: str) -> dict:
    head, _ = readme.split("\n---\n", 1)
    assert head.startswith("---\n"), "a Space README.md starts with its YAML front matter"
    return dict(line.split(": ", 1) for line in head[4:].splitlines() if ": " in line)


def test_budgets_are_the_perfect_squares_up_to_the_patch_count():
    assert valid_budgets(64) == [1, 4, 9, 16, 25, 36, 49, 64]
    assert valid_budgets(576)[-3:] == [484, 529, 576]
    assert [snap_budget(m, 576) for m in (36, 40, 43, 0, 1000)] == [36, 36, 49, 1, 576]
    assert snap_budget(42.5, 576) == 36  # a tie goes to the smaller budget


def test_export_space_layout(tmp_path):
    out = export_space(str(tmp_path / "space"))
    assert sorted(os.listdir(tmp_path)) == ["space"], "the temporary folder must be moved into place, not left"
    assert os.stat(out).st_mode & 0o777 == 0o755
    for name in SPACE_FILES:
        with open(os.path.join(REPO_ROOT, name), "rb") as ours, open(os.path.join(out, name), "rb") as copied:
            assert ours.read() == copied.read(), name
    for name in ("config.json", "model.safetensors", "modeling_qmop.py", "query_tokenizer/tokenizer.json"):
        assert os.path.isfile(os.path.join(out, "checkpoints", "qmop-tiny", name)), name
    with open(os.path.join(out, "space.json")) as f:
        assert json.load(f) == {"model": "checkpoints/qmop-tiny"}
    with open(os.path.join(out, "requirements.txt")) as f:
        requirements = [line for line in f.read().splitlines() if line and not line.startswith("#")]
    gradio = space.tested_gradio_version()
    assert requirements[0] == f"gradio=={gradio}" and "transformers>=5,<6" in requirements
    assert {"torch>=2.4", "safetensors", "tokenizers", "pillow", "numpy"} <= set(requirements)
    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        meta = front_matter(f.read())
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio and meta["app_file"] == "app.py"
    assert meta["license"] == "apache-2.0" and meta["title"] and meta["emoji"]
    assert 0 < len(meta["short_description"]) <= 60, "the Hub refuses longer short descriptions"


def _module_file(module: str):
    """The repository file of a dotted module name (`a/b.py` or `a/b/__init__.py`), or None."""
    path = module.replace(".", "/")
    for candidate in (f"{path}.py", f"{path}/__init__.py"):
        if os.path.isfile(os.path.join(REPO_ROOT, candidate)):
            return candidate
    return None


def test_space_files_hold_every_repository_module_the_app_imports():
    """An exported Space runs without this package: every import of a repository module in its files (and the
    packages above it) must be a file of the Space, except lazy imports on paths the app never takes."""
    never_taken = {  # functions whose lazy imports the app never reaches: (file, function) -> why
        ("qmop_tools/demo.py", "default_model"): "builds a random checkpoint when none is bundled; a Space records one",
        ("qmop_tools/vtcbench/visualize.py", "save_png"): "writes a picture to disk; the app hands it to gradio",
    }
    repo_modules = {"qmop_tools", "conversion"} | {n[:-3] for n in os.listdir(REPO_ROOT) if n.endswith(".py")}
    missing = set()
    for name in (n for n in SPACE_FILES if n.endswith(".py")):
        with open(os.path.join(REPO_ROOT, name)) as f:
            tree = ast.parse(f.read())
        skipped = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                   and (name, node.name) in never_taken for inner in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:  # `from package import module` needs the module
                modules = [f"{node.module}.{alias.name}" if _module_file(f"{node.module}.{alias.name}") else node.module
                           for alias in node.names]
            else:
                continue
            for module in modules:
                if module.split(".")[0] not in repo_modules:
                    continue
                parts = module.split(".")
                for depth in range(1, len(parts) + 1):
                    needed = _module_file(".".join(parts[:depth]))
                    if needed not in SPACE_FILES:
                        missing.add(f"{name} imports {module}: {needed or 'no such module'}")
    assert not missing, f"add to qmop_tools.space.SPACE_FILES: {sorted(missing)}"


def test_export_space_records_a_hub_id_or_copies_another_checkpoint(tmp_path):
    out = export_space(str(tmp_path / "hub"), model="someone/qmop-llava-7b-144")
    assert not os.path.exists(os.path.join(out, "checkpoints"))
    with open(os.path.join(out, "space.json")) as f:
        assert json.load(f) == {"model": "someone/qmop-llava-7b-144"}
    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        assert "models:\n- someone/qmop-llava-7b-144\n" in f.read()

    mine = shutil.copytree(BUNDLED, tmp_path / "my-qmop")
    out = export_space(str(tmp_path / "local"), model=str(mine))
    assert os.path.isfile(os.path.join(out, "checkpoints", "my-qmop", "model.safetensors"))
    with open(os.path.join(out, "space.json")) as f:
        assert json.load(f) == {"model": "checkpoints/my-qmop"}


def test_export_space_refuses_bad_models_before_writing(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint folder nor a Hub id"):
        export_space(str(tmp_path / "a"), model=str(tmp_path / "no" / "such" / "folder"))
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ValueError, match="convert it first"):
        export_space(str(tmp_path / "b"), model=str(llava))
    assert sorted(os.listdir(tmp_path)) == ["llava"]
    with pytest.raises(ValueError, match="which the export copies"):  # --overwrite must not delete its sources
        export_space(REPO_ROOT, overwrite=True)
    mine = shutil.copytree(BUNDLED, tmp_path / "mine")
    with pytest.raises(ValueError, match="which the export copies"):
        export_space(str(tmp_path), model=str(mine), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["llava", "mine"]


def test_export_space_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "space"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_space(str(out))
    assert os.listdir(out) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["space"]
    export_space(str(out), overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "app.py").is_file()
    assert sorted(os.listdir(tmp_path)) == ["space"]

    empty = tmp_path / "empty"
    empty.mkdir()
    export_space(str(empty))  # an empty folder is no one's work
    assert (empty / "app.py").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        export_space(str(tmp_path / "file"))


def test_export_space_writes_nothing_when_it_fails(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(space.shutil, "copytree", disk_full)
    with pytest.raises(OSError, match="disk full"):
        export_space(str(tmp_path / "new"))
    assert os.listdir(tmp_path) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        export_space(str(old), overwrite=True)
    assert os.listdir(tmp_path) == ["old"] and (old / "notes.txt").read_text() == "mine"


def test_resolve_model_order(tmp_path, monkeypatch):
    monkeypatch.delenv("QMOP_SPACE_MODEL", raising=False)
    monkeypatch.setattr(space, "SPACE_SETTINGS", str(tmp_path / "space.json"))
    monkeypatch.setattr(space, "REPO_ROOT", str(tmp_path))
    assert space.resolve_model() == (BUNDLED, True)  # nothing recorded: the bundled checkpoint
    (tmp_path / "space.json").write_text('{"model": "someone/recorded"}')
    assert space.resolve_model() == ("someone/recorded", True)
    shutil.copytree(BUNDLED, tmp_path / "checkpoints" / "tiny")
    (tmp_path / "space.json").write_text('{"model": "checkpoints/tiny"}')
    assert space.resolve_model() == (str(tmp_path / "checkpoints" / "tiny"), True)
    monkeypatch.setenv("QMOP_SPACE_MODEL", "someone/from-env")
    assert space.resolve_model() == ("someone/from-env", True)
    assert space.resolve_model("someone/given") == ("someone/given", True)


def test_command_line_export_and_argument_checks(tmp_path, capsys):
    parser = space.build_parser()
    assert parser.prog == "qmop space"
    space.main(["export", str(tmp_path / "space")])
    assert "wrote the Space" in capsys.readouterr().out and (tmp_path / "space" / "app.py").is_file()
    for argv, message in ((["export", str(tmp_path / "pushed"), "--push-to-hub", "not an id"], "not a Hub repository"),
                          (["export", str(tmp_path / "space")], "exists and is not empty"),
                          (["export", str(tmp_path / "other"), "--port", "1"], "unrecognized arguments: --port 1"),
                          ([], "required")):
        with pytest.raises(SystemExit) as stopped:
            space.main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["space"]


def test_outside_a_checkout_export_and_run_say_what_is_missing(tmp_path, monkeypatch, capsys):
    """A non-editable install has no app.py or assets beside the package: a clear message, nothing written."""
    monkeypatch.setattr(space, "REPO_ROOT", str(tmp_path / "site-packages"))
    with pytest.raises(SystemExit) as stopped:
        space.main(["export", str(tmp_path / "space")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "app.py" in err and "missing under" in err
    assert not (tmp_path / "space").exists()
    with pytest.raises(SystemExit, match="app.py is missing"):
        space.main(["run"])


def test_command_line_run_hands_its_options_to_the_app(capsys):
    pytest.importorskip("gradio", reason=NO_GRADIO)
    with pytest.raises(SystemExit) as stopped:
        space.main(["run", "--help"])  # app.py's own help: its options, nothing started
    assert stopped.value.code == 0 and "--port" in capsys.readouterr().out


def test_push_space_uploads_to_a_gradio_space(tmp_path, monkeypatch):
    """No real Hub here: the two HfApi calls are recorded, their arguments bound to the installed signatures."""
    import inspect

    from huggingface_hub import HfApi

    calls = {}
    for method in ("create_repo", "upload_folder"):
        signature = inspect.signature(getattr(HfApi, method))
        record = lambda self, *a, _method=method, _signature=signature, **k: calls.__setitem__(  # noqa: E731
            _method, _signature.bind(self, *a, **k).arguments)
        monkeypatch.setattr(HfApi, method, record)
    with pytest.raises(ValueError, match="not a Hub repository id"):
        space.push_space(str(tmp_path), "me/qmop space")
    assert not calls
    assert space.push_space(str(tmp_path), "me/qmop-space") == "https://huggingface.co/spaces/me/qmop-space"
    create, upload = calls["create_repo"], calls["upload_folder"]
    assert create["repo_id"] == "me/qmop-space" and create["repo_type"] == "space" and create["space_sdk"] == "gradio"
    assert upload["repo_id"] == "me/qmop-space" and upload["repo_type"] == "space"
    assert upload["folder_path"] == str(tmp_path)


# ---------------------------------------------------------------------------------------------- in a browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, process: subprocess.Popen, log_path: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    with open(log_path) as f:
        log = f.read()[-4000:]
    state = f"exited with {process.returncode}" if process.poll() is not None else f"no answer in {timeout:.0f} s"
    pytest.fail(f"the Space's app.py {state} at {url}; its output:\n{log}")


def _artifact_path() -> str:
    folder = os.environ.get("QMOP_TEST_ARTIFACTS") or os.path.join(REPO_ROOT, "outputs", "test-artifacts")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, "space.png")


def test_exported_space_answers_in_a_headless_browser(tmp_path):
    pytest.importorskip("gradio", reason=NO_GRADIO)
    pytest.importorskip("selenium", reason="selenium is not installed (requirements/space.txt)")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            pytest.skip(f"{binary} is missing: apt-get install chromium chromium-driver (scripts/setup_env.sh)")
    from importlib.metadata import version

    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from qmop_tools.demo import answer_with, load

    assert version("gradio") == space.tested_gradio_version(), "requirements/space.txt must pin the gradio tested here"
    folder = export_space(str(tmp_path / "space"))
    port = _free_port()
    base = f"http://127.0.0.1:{port}/"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QMOP_SPACE_MODEL")}
    env["GRADIO_TEMP_DIR"] = str(tmp_path / "gradio")  # uploads and pictures, not left in /tmp/gradio
    log_path = str(tmp_path / "app.log")
    with open(log_path, "w") as log:  # the Space's own modules only: no PYTHONPATH, run from its folder
        process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--host", "127.0.0.1", "--quiet"],
                                   cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    driver = None
    try:
        question = DEMO["questions"][1]  # the letter: routed to the pruning branch
        image = os.path.join(folder, "assets", "demo.png")
        model, processor = load(os.path.join(folder, "checkpoints", "qmop-tiny"))  # while the server starts
        expected = answer_with(model, processor, image, question)["answer"]
        _wait_for_http(base, process, log_path)

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,1180"):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        # gradio re-renders outputs while a condition reads them: a stale element is retried, not a failure
        wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))
        driver.get(base)

        def css(selector):
            return driver.find_element(By.CSS_SELECTOR, selector)

        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))

        css("#ask").click()  # no image yet: a clear message, not a traceback
        wait.until(lambda d: "Upload an image first" in " ".join(
            e.text for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]")))
        for close in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-close]"):
            close.click()

        css("#image input[type=file]").send_keys(image)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        css("#question textarea").send_keys(question)
        css("#ask").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value"))
        assert css("#answer textarea").get_attribute("value") == expected
        width = wait.until(lambda d: d.execute_script(
            "const img = document.querySelector('#analysis img'); return img && img.complete && img.naturalWidth"))
        assert width > 0, "the analysis picture is not displayed"
        assert "pruning" in css("#router").text and "576 patches" in css("#tokens").text
        driver.save_screenshot(_artifact_path())

        budget = css("#budget input[type=number]")  # 60 is no perfect square: snapped to 64 when typed
        budget.send_keys(Keys.CONTROL, "a")  # a modifier holds until the call ends
        budget.send_keys("60", Keys.TAB)
        wait.until(lambda d: css("#budget input[type=number]").get_attribute("value") == "64")
        css("#ask").click()
        wait.until(lambda d: "64" in [cell.text for cell in d.find_elements(By.CSS_SELECTOR, "#tokens td")])

        css("#question textarea").send_keys(Keys.CONTROL, "a")  # typed: clear() sends no input event
        css("#question textarea").send_keys(Keys.BACKSPACE)
        css("#ask").click()
        wait.until(lambda d: "Type a question" in " ".join(
            e.text for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]")))

        requests = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
        urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
        outside = sorted(u for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")
                         and urlsplit(u).netloc != f"127.0.0.1:{port}")
        assert not outside, f"the page fetched from outside (it must work offline): {outside}"
    finally:
        if driver is not None:
            driver.quit()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
