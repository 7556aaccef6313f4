"""`python -m shared.credentials init DIR`: the compose stack's secrets, made once on its first start.

Writes, unless already there:
- `api_key`: the key every service demands (`MODELWORKS_API_KEY` if the operator set one, else random);
- `redis_password` and `redis.conf` (`requirepass`): Redis is never open, even inside the compose network;
- `gateway_auth`: the web app's `user:password` (`MODELWORKS_GATEWAY_AUTH`, else `admin:<random>`).
An operator's value that differs from the stored one replaces it (rotation); every file is written whole
or not at all.
Services read them through `*_file` settings (`MODELWORKS_API_KEY_FILE`, ...), so no secret sits in the
compose file, the environment of `docker inspect`, or a log. Torch-free: it runs before any model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import tempfile
from pathlib import Path


def _write(path: Path, text: str, replace: bool) -> bool:
    """Put `text` in `path` whole or not at all (a temporary file moved into place), readable by its owner
    and group only; unless `replace`, an existing file is kept. True if the file was written."""
    if path.exists() and not replace:
        return False
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, 0o640)
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if another process made it meanwhile: theirs stands
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return True


def _stored(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def _operator_or_random(folder: Path, name: str, given: str | None, make, made: list[str]) -> None:
    """The operator's value when given (replacing a different stored one: that is how a key is rotated),
    else the stored one, else a new random one."""
    path = folder / name
    if given:
        if _stored(path) != given and _write(path, given, replace=True):
            made.append(name)
    elif _write(path, make(), replace=False):
        made.append(name)


def init(folder: Path, environ: dict[str, str]) -> list[str]:
    """Make the missing secrets in `folder`; returns what was written, for the log (names, never values)."""
    folder.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    _operator_or_random(folder, "api_key", environ.get("MODELWORKS_API_KEY"), lambda: secrets.token_urlsafe(32), made)
    _operator_or_random(
        folder,
        "gateway_auth",
        environ.get("MODELWORKS_GATEWAY_AUTH"),
        lambda: f"admin:{secrets.token_urlsafe(18)}",
        made,
    )
    _operator_or_random(folder, "redis_password", None, lambda: secrets.token_urlsafe(32), made)
    password = _stored(folder / "redis_password")
    if _stored(folder / "redis.conf") != f"requirepass {password}":  # made from the stored password, every time
        _write(folder / "redis.conf", f"requirepass {password}\n", replace=True)
    return made


def read_secret(path: Path) -> str:
    """A secret file's value, with the newline an editor adds removed; an empty file is an error."""
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"{path} is empty")
    return value


def fill_from_files(data: dict, pairs: tuple[tuple[str, str], ...]) -> dict:
    """Settings input with each `(file_field, field)` pair's secret read from its file when only the file is set."""
    data = dict(data)
    for file_field, target in pairs:
        if data.get(file_field) and not data.get(target):
            try:
                data[target] = read_secret(Path(data[file_field]))
            except OSError as error:  # a settings error naming the field, not a traceback
                raise ValueError(f"{file_field}: cannot read {data[file_field]}: {error.strerror}") from None
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.credentials", description=__doc__)
    parser.add_argument("command", choices=["init"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    made = init(args.folder, dict(os.environ))
    if made:
        print(f"made {', '.join(made)} in {args.folder}")
        if "gateway_auth" in made:
            print(f"the web app's login is in {args.folder / 'gateway_auth'} (docker compose exec gateway cat it)")
    else:
        print(f"the secrets in {args.folder} are already there; nothing changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
