"""The coordinator's core: the event loop, client requests, dispatch, and the job table."""
