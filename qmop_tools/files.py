"""Writing folders so that nothing half-written ever stands where the user looks: build beside, then move."""

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_folder(output: str):
    """Yield a temporary folder beside `output`; when the block succeeds it replaces `output`, otherwise it is
    removed. Nothing half-written ever stands at `output`."""
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output)}.tmp-")
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes the folder private; the result is an ordinary folder
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained_atomically(output: str, *objects) -> str:
    """`save_pretrained` every object (model, processor, config...) into one folder, atomically."""
    with atomic_folder(output) as tmp:
        for obj in objects:
            obj.save_pretrained(tmp)
    return os.path.abspath(output)
