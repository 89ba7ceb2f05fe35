"""What every benchmark script writes next to its table: the rows plus when, where and how they were measured."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path


def write_json(path: str | Path, rows: list[dict], **extra) -> None:
    import torch
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "command": " ".join(sys.argv), **extra, "rows": rows}, indent=1))
