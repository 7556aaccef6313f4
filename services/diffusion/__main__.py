"""`python -m services.diffusion --port 50052`: serve the configured diffusion models over gRPC."""

from shared.cli import run_service


async def _serve(settings, options):
    from services.diffusion.app import serve  # torch and diffusers load after argument errors

    return await serve(settings, options)


if __name__ == "__main__":
    run_service("diffusion", __doc__, _serve)
