"""The OpenAI-compatible HTTP gateway (README, "HTTP").

It runs in a process of its own (`python -m orchestrator.http`), started and restarted by the
coordinator (`supervise.Gateway`), and reaches the coordinator as an ordinary ZMQ client (AsyncClient):
a slow HTTP client can never stall the coordinator's loop. Only `settings` and `supervise` are imported
by the coordinator; they import no web framework (the gateway process imports Starlette and uvicorn).
"""
