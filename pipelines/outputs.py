"""What a job's outputs are on any filesystem Beam knows (local, gs://, s3://), found and removed.

A job writes ``<prefix>-SSSSS-of-NNNNN<suffix>`` shards through Beam's file sinks, which stage them in a
``beam-temp-<prefix name>-<uuid>`` folder beside them and rename them at the end, and an optional failures
file (staged the same way). ``job_files`` finds all of these for one prefix; the driver refuses to start
where any exist (unless ``--overwrite``, which removes them first) and removes them when a job is
interrupted, so that what a job leaves is complete or absent.
"""

from __future__ import annotations

import glob
import os
from typing import Iterable, List, Optional

from apache_beam.io.filesystems import FileSystems


def _parent_and_name(path: str):
    parent, name = FileSystems.split(path)
    return parent, name


def _match(pattern: str) -> List[str]:
    try:
        result = FileSystems.match([pattern])[0]
    except Exception:  # nothing there (some filesystems raise instead of matching nothing)
        return []
    return [m.path for m in result.metadata_list]


def _temp_folders(path: str) -> List[str]:
    """Paths inside (object stores) or of (local) Beam's staging folders for files written at ``path``."""
    parent, name = _parent_and_name(path)
    if not name:
        return []
    pattern = FileSystems.join(parent, f"beam-temp-{name}-*") if parent else f"beam-temp-{name}-*"
    if "://" not in path:  # local: Beam's match lists files only, and a staging folder may be empty
        return glob.glob(glob.escape(parent or ".") + os.sep + glob.escape(f"beam-temp-{name}-") + "*")
    return _match(pattern + "/*")  # object stores have no folders: the objects below the staging prefix


def job_files(output: Optional[str], failures: Optional[str]) -> List[str]:
    """The shards of ``output``, the ``failures`` file, and Beam's staging folders (or objects) of both."""
    found: List[str] = []
    if output:
        found += _match(f"{output}-*-of-*")
        found += _temp_folders(output)
    if failures:
        found += [p for p in _match(failures) if p.rstrip("/") == failures.rstrip("/")]
        found += _temp_folders(failures)
    return sorted(set(found))


def remove(paths: Iterable[str]) -> int:
    """Deletes files (and local staging folders, recursively); returns how many paths were removed."""
    paths = [p for p in paths]
    removed = 0
    for path in paths:
        try:
            FileSystems.delete([path])
            removed += 1
        except Exception:  # already gone (a folder removed with its parent, a concurrent cleanup)
            pass
    return removed


def describe(paths: List[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
