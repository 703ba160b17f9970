"""The `orchestrator` command: main.py (the parser and the client commands), serve.py, the status table,
the demo."""

# Exit codes of every command (README, "CLI").
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3
