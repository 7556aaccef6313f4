"""`python -m shared.credentials init DIR`: the compose stack's secrets, made once on its first start.

Writes, unless already there:
- `api_key`: the key every service demands (`MODELWORKS_API_KEY` if the operator set one, else random);
- `redis_password` and `redis.conf` (`requirepass`): Redis is never open, even inside the compose network;
- `gateway_auth`: the web app's `user:password` (`MODELWORKS_GATEWAY_AUTH`, else `admin:<random>`).
Services read them through `*_file` settings (`MODELWORKS_API_KEY_FILE`, ...), so no secret sits in the
compose file, the environment of `docker inspect`, or a log. Torch-free: it runs before any model loads.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path


def _write_once(path: Path, text: str) -> bool:
    """Create `path` with `text`, readable by its owner and group only; False if it already exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as file:
        file.write(text)
    return True


def init(folder: Path, environ: dict[str, str]) -> list[str]:
    """Make the missing secrets in `folder`; returns what was made, for the log (names, never values)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    api_key = environ.get("MODELWORKS_API_KEY") or secrets.token_urlsafe(32)
    if _write_once(folder / "api_key", api_key):
        made.append("api_key")
    password = secrets.token_urlsafe(32)
    if _write_once(folder / "redis_password", password):
        made.append("redis_password")
        _write_once(folder / "redis.conf", f"requirepass {password}\n")
    login = environ.get("MODELWORKS_GATEWAY_AUTH") or f"admin:{secrets.token_urlsafe(18)}"
    if _write_once(folder / "gateway_auth", login):
        made.append("gateway_auth")
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
            data[target] = read_secret(Path(data[file_field]))
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
