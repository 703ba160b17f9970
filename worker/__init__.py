"""gpu-orchestrator worker process: runs one handler on its own device set. Started as `python -m worker`."""
