"""Every volume as an NBD export: a sans-I/O protocol module and an asyncio server."""
