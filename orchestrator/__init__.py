"""gpu-orchestrator: a coordinator process that runs one worker process per GPU (or TP group).

Importing this package never imports torch.
"""
from orchestrator.client.sync import Client, JobHandle, RequestError, wait_ready
from orchestrator.client.aio import AsyncClient, AsyncJob

__all__ = ["AsyncClient", "AsyncJob", "Client", "JobHandle", "RequestError", "wait_ready"]
__version__ = "0.1.0"
