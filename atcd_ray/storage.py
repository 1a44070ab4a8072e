"""Files on object storage: ``s3://``, ``gs://``, ``hdfs://`` or ``file://`` URIs through pyarrow's
filesystems (the ones Ray Train's storage uses), so a checkpoint need not be on a shared disk.

Credentials and endpoints are pyarrow's: the AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for an S3-compatible
server such as MinIO or SeaweedFS), or the URI's query (``?endpoint_override=...&scheme=http``).
"""
from __future__ import annotations

import re
from pathlib import Path

from .core.checkpoint import Checkpoint, CheckpointError

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(text: str | Path) -> bool:
    return isinstance(text, str) and bool(_URI.match(text))


def local_copy(source: str | Path, directory: str | Path) -> Path:
    """``source`` itself when it is a local path, else a copy of the file it names in ``directory``."""
    if not is_uri(source):
        return Path(source)
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(source)
        is_file = filesystem.get_file_info(path).type == pyarrow.fs.FileType.File
        target = Path(directory) / Path(path).name
        if is_file:
            pyarrow.fs.copy_files(path, str(target), source_filesystem=filesystem,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError: a malformed URI
        raise CheckpointError(f"{source}: cannot be read ({' '.join(str(err).split())})") from None
    if not is_file:
        raise FileNotFoundError(f"{source}: no such file")
    return target


def read_checkpoint(local: Path, source: str | Path) -> Checkpoint:
    """``Checkpoint(local)``, its errors naming ``source`` (the URI ``local`` was copied from), not the copy."""
    try:
        return Checkpoint(local)
    except CheckpointError as err:
        raise CheckpointError(str(err).replace(str(local), str(source))) from None


def _filesystem(uri: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri.rstrip("/"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{uri}: cannot be reached ({' '.join(str(err).split())})") from None


def _run_file(relative: str) -> bool:
    """A run directory's own files; Ray's checkpoint directories (Ray restores them itself) are not."""
    return not relative.split("/", 1)[0].startswith("checkpoint_")


def download_run(uri: str, directory: Path) -> Path:
    """The run files under ``uri`` (none for a new run) copied into ``directory``."""
    import pyarrow.fs

    filesystem, root = _filesystem(uri)
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    for info in found:
        relative = info.path[len(root):].lstrip("/")
        if info.type == pyarrow.fs.FileType.File and _run_file(relative):
            target = directory / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(info.path, str(target), source_filesystem=filesystem,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
    return directory


class RunUpload:
    """Keeps ``uri`` up to date with a local run directory: ``__call__`` uploads the files that are
    new or changed since the last call. An object is replaced whole (S3 writes are atomic per
    object), checkpoints first and summary.json last, so a reader never finds metrics or a summary
    ahead of the checkpoint they belong to."""

    def __init__(self, directory: Path, uri: str):
        self.directory, self.uri, self.sent = Path(directory), uri.rstrip("/"), {}

    def __call__(self) -> None:
        import pyarrow.fs

        filesystem, root = _filesystem(self.uri)
        files = [p for p in self.directory.rglob("*") if p.is_file() and not p.name.startswith(".")]
        for path in sorted(files, key=lambda p: (p.suffix != ".safetensors", p.name == "summary.json", str(p))):
            relative = path.relative_to(self.directory).as_posix()
            stat = path.stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
            if _run_file(relative) and self.sent.get(relative) != stamp:
                pyarrow.fs.copy_files(str(path), f"{root}/{relative}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                                      destination_filesystem=filesystem)
                self.sent[relative] = stamp
