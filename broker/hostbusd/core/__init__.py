"""The broker's pure core: topic index, sessions, outbound queues, router. No I/O, no event loop."""
