"""The checkpoint's own remote code (modeling_qmop.py, processing_qmop.py), found beside its config class.

vLLM loads a QMoP config with `trust_remote_code`, so the config class lives in a `transformers_modules` package
next to the other remote-code files of the same checkpoint (or is the installed top-level `configuration_qmop`).
The plugin uses those same files, so a checkpoint is served with the code it was saved with.
"""

import importlib
from types import ModuleType

from transformers.dynamic_module_utils import get_class_from_dynamic_module

_ANCHOR_CLASS = {"modeling_qmop": "QMoPModel", "processing_qmop": "QMoPProcessor"}


def remote_module(config, name: str) -> ModuleType:
    """Module `name` ("modeling_qmop" or "processing_qmop") of the checkpoint `config` was loaded from."""
    if name not in _ANCHOR_CLASS:
        raise ValueError(f"Unknown remote-code module {name!r}; expected one of {sorted(_ANCHOR_CLASS)}.")
    config_module = type(config).__module__
    package, _, _ = config_module.rpartition(".")
    try:
        return importlib.import_module(f"{package}.{name}" if package else name)
    except ImportError:
        pass
    source = getattr(config, "_name_or_path", None)
    if not source:
        raise ValueError(
            f"Cannot find {name}.py for the config class {config_module}.{type(config).__name__}: it is not beside "
            "the config module and the config has no `_name_or_path` to load it from."
        )
    cls = get_class_from_dynamic_module(f"{name}.{_ANCHOR_CLASS[name]}", source)
    return importlib.import_module(cls.__module__)
