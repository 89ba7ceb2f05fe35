"""Loading user code named in a recipe ('package.module:function' or 'path/to/file.py:function'). Standard library
only: the reward process (trainer/reward_process.py) imports this before anything else."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable


def import_function(spec: str) -> Callable[..., Any]:
    """'package.module:function' or 'path/to/file.py:function' → the object (raises what the import raises)."""
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"file '{path}' does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"tokenwise_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, attr)


def first_line(e: BaseException) -> str:
    """'Type: first line of the message' (or just the type)."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text.strip() else type(e).__name__
