"""`python -m services.finetune --port 50053`: the fine-tune API (validates, stores and queues jobs; no torch)."""

from shared.cli import run_service


async def _serve(settings, options):
    from services.finetune.app import serve

    return await serve(settings, options)


if __name__ == "__main__":
    run_service("finetune", __doc__, _serve)
