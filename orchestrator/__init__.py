"""gpu-orchestrator: a coordinator process that runs one worker process per GPU (or TP group).

Importing this package never imports torch.
"""
from .client import Client, JobHandle, RequestError, wait_ready
from .aioclient import AsyncClient, AsyncJob

__all__ = ["AsyncClient", "AsyncJob", "Client", "JobHandle", "RequestError", "wait_ready"]
__version__ = "0.1.0"
