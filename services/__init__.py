"""ModelWorks services: each subpackage is a separate gRPC server process (`python -m services.<name>`)."""
