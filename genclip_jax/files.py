"""Atomic writes: results, configs, tables and output folders are whole or absent, never half."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile


def write_atomic(path: str | os.PathLike, data: str | bytes) -> pathlib.Path:
    """Writes `data` via a temporary file in the same folder, fsync and `os.replace`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mode = "wb" if isinstance(data, bytes) else "w"
        kwargs = {} if isinstance(data, bytes) else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(handle, mode, **kwargs) as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


# A file that marks a folder as an output of ours (an eval or predict folder), so that it may be
# replaced as a whole; a folder without it may hold a user's files and is never replaced.
OUTPUT_MARKER = ".genclip_jax_output"


def check_replaceable(path: str | os.PathLike, flag: str) -> pathlib.Path:
    """`path` may become an output folder: it is absent, empty, or an earlier output of ours.

    `flag` names the option that chose `path`, for the error. Returns the absolute path.
    """
    path = pathlib.Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag}: {path} is a file; expected a folder to write the results into")
    if path.is_dir() and any(path.iterdir()) and not (path / OUTPUT_MARKER).is_file():
        raise ValueError(
            f"{flag}: {path} exists and holds files that genclip-jax did not write; it would be "
            "replaced as a whole, so give an empty or new folder"
        )
    return path


def check_writable(folder: str | os.PathLike, flag: str) -> None:
    """PermissionError unless `folder` could be created and written (checked on its nearest
    existing ancestor without writing anything: a read-only run must fail before any work)."""
    folder = pathlib.Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{flag}: cannot write into {folder} ({existing} is not a writable folder, e.g. a "
            "read-only file system); give a writable folder"
        )


def swap_directory(staging: pathlib.Path, final: pathlib.Path) -> None:
    """Puts the complete folder `staging` in place of `final` (renames only; the old one is moved
    aside first and deleted last, so `final` is always either the old or the new whole)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
