"""transformers' own common test utilities (ModelTesterMixin, ProcessorTesterMixin, ...), taken at test time from the
source distribution of the installed transformers release, never copied into this repository.

    pkg = load_transformers_tests()          # "hf_tests", importable: hf_tests.test_modeling_common, ...

The sdist is fetched with pip (`pip download transformers==<installed> --no-binary :all: --no-deps`) into
`.cache/transformers-tests/<version>/` (gitignored) once; its `tests/*.py` become the package `hf_tests`.

The sdist ships only the top-level `tests/*.py` files. Modules they import that it lacks are replaced by
empty stand-ins written next to them (listed in MISSING_FROM_SDIST): the mixins that live there are not run.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import pytest
import transformers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_ROOT = os.path.join(REPO_ROOT, ".cache", "transformers-tests")
PACKAGE = "hf_tests"

# Modules imported by the sdist's tests but not shipped in it -> the stand-in written in their place.
MISSING_FROM_SDIST = {
    # test_modeling_common does `from .generation.test_utils import GenerationTesterMixin`.
    "generation/test_utils.py": "class GenerationTesterMixin:  # not in transformers' sdist\n    pass\n",
    # 5.x: `from .exporters.test_export import ExportTesterMixin` (torch.export checks, base of ModelTesterMixin).
    "exporters/test_export.py": "class ExportTesterMixin:  # not in transformers' sdist\n    pass\n",
}
# test_processing_common imports transformers' CI helper utils/fetch_hub_objects_for_ci.py (repository root, next to
# tests/) to map hub URLs of test media to local files; the tests run here pass local objects only.
UTILS_STAND_IN = {
    "utils/__init__.py": "",
    "utils/fetch_hub_objects_for_ci.py": "def url_to_local_path(url, **kwargs):  # not in transformers' sdist\n    return url\n",
}
NOT_IN_SDIST_REASON = (
    "transformers' source distribution does not ship tests/generation/test_utils.py, so GenerationTesterMixin "
    "cannot be taken from it (the generation behaviour is tested in tests/test_generation.py)"
)


def _download_sdist(version: str, target: str) -> str:
    command = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:",
               "--no-deps", "--disable-pip-version-check", "-q", "-d", target]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    archives = [name for name in os.listdir(target) if name.endswith(".tar.gz")]
    if result.returncode != 0 or not archives:
        raise RuntimeError(f"`{' '.join(command)}` failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return os.path.join(target, archives[0])


def _build_package(archive: str, package_dir: str) -> None:
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and "/tests/" in m.name and m.name.endswith(".py")]
        if not members:
            raise RuntimeError(f"{os.path.basename(archive)} holds no tests/ folder")
        for member in members:
            relative = member.name.split("/tests/", 1)[1]
            destination = os.path.join(package_dir, relative)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            with tar.extractfile(member) as source, open(destination, "wb") as out:
                shutil.copyfileobj(source, out)
    for relative, text in MISSING_FROM_SDIST.items():
        destination = os.path.join(package_dir, relative)
        if not os.path.exists(destination):
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            with open(destination, "w") as out:
                out.write(text)
    for root, _, files in os.walk(package_dir):
        if "__init__.py" not in files:
            open(os.path.join(root, "__init__.py"), "w").close()


def load_transformers_tests() -> str:
    """Put the installed release's test package on sys.path (building the cache on first use) and return its
    name; skip the calling module, with the reason, when the sdist cannot be downloaded."""
    version = transformers.__version__
    version_dir = os.path.join(CACHE_ROOT, version)
    package_dir = os.path.join(version_dir, PACKAGE)
    if not os.path.isdir(package_dir):
        os.makedirs(version_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=version_dir) as tmp:
            try:
                archive = _download_sdist(version, tmp)
            except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                pytest.skip(f"transformers {version}'s source distribution could not be downloaded: {error}",
                            allow_module_level=True)
            staging = os.path.join(tmp, PACKAGE)
            _build_package(archive, staging)
            for relative, text in UTILS_STAND_IN.items():
                destination = os.path.join(version_dir, relative)
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                with open(destination, "w") as out:
                    out.write(text)
            try:
                os.replace(staging, package_dir)  # atomic: a half-built package never stands in the cache
            except OSError:
                if not os.path.isdir(package_dir):  # another process built it first otherwise
                    raise
    for path in (version_dir, os.path.join(version_dir, "utils")):  # 4.57 imports `utils.<helper>`, 5.x `<helper>`
        if path not in sys.path:
            sys.path.insert(0, path)
    return PACKAGE
