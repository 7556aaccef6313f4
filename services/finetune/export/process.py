"""Run an export as `python -m services.finetune.export` in a child process, for the fine-tune API.

The API stays free of torch and of a base model's memory: the child loads, merges and writes, then exits and
gives its memory back. Its JSON line says what it wrote, or why it refused (with the status code to answer).
A caller that goes away, or an export past `finetune.export_timeout_s`, stops the child, whose staging
folder is then removed (it ends on SIGTERM as on an error).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from shared import errors

log = logging.getLogger(__name__)

_CODES = {
    cls.code: cls for cls in (errors.InvalidArgument, errors.NotFound, errors.FailedPrecondition, errors.AlreadyExists)
}
STOP_GRACE_S = 30.0


async def run_export(arguments: list[str], timeout_s: float) -> dict:
    """The export's metadata as the child printed it; a ServiceError for a refusal, a timeout or a crash."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.finetune.export", *arguments, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(child.communicate(), timeout_s)
    except TimeoutError:
        await _stop(child)
        raise errors.DeadlineExceeded(
            f"the export took longer than finetune.export_timeout_s ({timeout_s:g} s) and was stopped"
        ) from None
    except asyncio.CancelledError:  # the caller went away: nobody waits for this export
        await _stop(child)
        raise
    lines = stdout.decode(errors="replace").strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if child.returncode == 0 and result is not None:
        return result
    if result is not None and "error" in result:
        error = result["error"]
        raise _CODES.get(error.get("code"), errors.FailedPrecondition)(error.get("message", "the export was refused"))
    log.error(
        "export failed", extra={"returncode": child.returncode, "stderr": stderr.decode(errors="replace")[-4000:]}
    )
    raise errors.ServiceError("the export failed with an internal error; the fine-tune service's log has the details")


async def _stop(child: asyncio.subprocess.Process) -> None:
    if child.returncode is not None:
        return
    child.terminate()
    try:
        await asyncio.wait_for(child.wait(), STOP_GRACE_S)
    except TimeoutError:
        child.kill()
        await child.wait()
