"""A file streamed in chunks into its own staging folder, bounded in size and gone unless it is kept."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from shared.errors import ResourceExhausted


class StagedUpload:
    def __init__(self, root: Path, filename: str, limit: int, limit_setting: str):
        root.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=root))
        self.path = self.staging / filename
        self.size, self._limit, self._limit_setting = 0, limit, limit_setting
        self._file = self.path.open("wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._limit:
            raise ResourceExhausted(f"the upload is over the limit of {self._limit} bytes ({self._limit_setting})")
        self._file.write(chunk)

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.staging, ignore_errors=True)
