"""What a job's outputs are on any filesystem Beam knows (local, gs://, s3://), found and removed.

A job writes ``<prefix>-SSSSS-of-NNNNN<suffix>`` shards through Beam's file sinks, which stage them in a
``beam-temp-<prefix name>-<uuid>`` folder beside them and rename them at the end, and an optional failures
file (staged the same way). ``job_files`` finds all of these for one prefix; the driver refuses to start
where any exist (unless ``--overwrite``, which removes them first) and removes them when a job is
interrupted, so that what a job leaves is complete or absent.

Local paths are found and removed without Apache Beam (whose import alone takes seconds): a usage error about
an earlier run's files, and the cleanup after a Ctrl-C, come back at once. Paths with a scheme (``gs://``,
``s3://``) go through Beam's ``FileSystems``, which the caller has set up with the job's options.
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Iterable, List, Optional


def is_local(path: Optional[str]) -> bool:
    return bool(path) and "://" not in path


def _match(pattern: str) -> List[str]:
    from apache_beam.io.filesystems import FileSystems

    try:
        result = FileSystems.match([pattern])[0]
    except Exception:  # nothing there (some filesystems raise instead of matching nothing)
        return []
    return [m.path for m in result.metadata_list]


def _temp_folders(path: str) -> List[str]:
    """Paths inside (object stores) or of (local) Beam's staging folders for files written at ``path``."""
    if is_local(path):  # Beam's local match lists files only, and a staging folder may be empty
        parent, name = os.path.split(path)
        if not name:
            return []
        return glob.glob(glob.escape(parent or ".") + os.sep + glob.escape(f"beam-temp-{name}-") + "*")
    from apache_beam.io.filesystems import FileSystems

    parent, name = FileSystems.split(path)
    if not name:
        return []
    pattern = FileSystems.join(parent, f"beam-temp-{name}-*") if parent else f"beam-temp-{name}-*"
    return _match(pattern + "/*")  # object stores have no folders: the objects below the staging prefix


def _shards(output: str) -> List[str]:
    if is_local(output):
        parent, name = os.path.split(output)
        return [p for p in glob.glob(glob.escape(output) + "-*-of-*") if os.path.isfile(p)] if name else []
    return _match(f"{output}-*-of-*")


def _file(path: str) -> List[str]:
    if is_local(path):
        return [path] if os.path.isfile(path) else []
    return [p for p in _match(path) if p.rstrip("/") == path.rstrip("/")]


def job_files(output: Optional[str], failures: Optional[str]) -> List[str]:
    """The shards of ``output``, the ``failures`` file, and Beam's staging folders (or objects) of both."""
    found: List[str] = []
    if output:
        found += _shards(output)
        found += _temp_folders(output)
    if failures:
        found += _file(failures)
        found += _temp_folders(failures)
    return sorted(set(found))


def remove(paths: Iterable[str]) -> int:
    """Deletes files (and local staging folders, recursively); returns how many paths were removed."""
    removed = 0
    for path in list(paths):
        try:
            if not is_local(path):
                from apache_beam.io.filesystems import FileSystems

                FileSystems.delete([path])
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed += 1
        except Exception:  # already gone (a folder removed with its parent, a concurrent cleanup)
            pass
    return removed


def describe(paths: List[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
