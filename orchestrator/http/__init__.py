"""The OpenAI-compatible HTTP gateway (README, "HTTP").

It runs in a process of its own (`python -m orchestrator.http`), started and restarted by the
coordinator (`supervise.Gateway`), and reaches the coordinator as an ordinary ZMQ client (AsyncClient):
a slow HTTP client can never stall the coordinator's loop. Only `supervise` is imported by the
coordinator, and it imports no web framework (the gateway process imports Starlette and uvicorn); the
`[http]` config rules are checked with the rest of the config (orchestrator/config.py).
"""
