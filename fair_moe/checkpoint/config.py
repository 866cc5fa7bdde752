"""The output's config.json: the source's own file with only what pruning changed patched in.

Re-saving a config through the installed transformers rewrites it in that version's form (transformers 5 keeps
``rope_parameters`` and drops ``rope_theta``, which transformers 4.x then silently defaults), so when the source
folder is at hand its config.json is patched instead: every field it had stays as written.
"""

from __future__ import annotations

import json
from pathlib import Path


def config_changes(before: dict, after: dict) -> dict:
    """Top-level fields whose value pruning changed or added (``config.to_dict()`` before and after)."""
    return {key: value for key, value in after.items() if key not in before or before[key] != value}


def write_patched_config(source_dir: Path, folder: Path, changes: dict, drop: tuple[str, ...] = ()) -> None:
    """``folder/config.json`` = the source's config.json with ``changes`` set and the ``drop`` fields removed (its
    other fields untouched)."""
    data = json.loads((Path(source_dir) / "config.json").read_text())
    data.update(json.loads(json.dumps(changes, default=str)))
    for name in drop:
        data.pop(name, None)
    (Path(folder) / "config.json").write_text(json.dumps(data, indent=2) + "\n")
