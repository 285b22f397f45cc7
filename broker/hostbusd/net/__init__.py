"""Transports: thin asyncio shells that move bytes between the kernel and the sans-IO core."""
