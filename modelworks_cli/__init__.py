"""`modelworks`: a command line for the ModelWorks services, over their gRPC APIs.

A client only: it imports the generated stubs (`modelworks.*`) and nothing of the services, so it runs
wherever the stubs and grpcio are installed, without torch.
"""
