"""Files on object storage: ``s3://``, ``gs://``, ``hdfs://`` or ``file://`` URIs through pyarrow's
filesystems (the ones Ray Train's storage uses), so a checkpoint need not be on a shared disk.

Credentials and endpoints are pyarrow's: the AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for an S3-compatible
server such as MinIO or SeaweedFS), or the URI's query (``?endpoint_override=...&scheme=http``).
"""
from __future__ import annotations

import re
from pathlib import Path

from .core.checkpoint import CheckpointError

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
