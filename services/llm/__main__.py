"""`python -m services.llm --port 50051`: serve the configured LLMs over gRPC."""

from shared.cli import run_service


async def _serve(settings, options):
    from services.llm.app import serve  # torch and transformers load after argument errors

    return await serve(settings, options)


if __name__ == "__main__":
    run_service("llm", __doc__, _serve)
