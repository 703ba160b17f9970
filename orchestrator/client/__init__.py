"""The client side: sync and asyncio clients. Imports nothing from the server side."""
