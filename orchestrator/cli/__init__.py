"""The `orchestrator` command: serve, the client commands, the status table, the demo."""
