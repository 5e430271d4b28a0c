"""The routes, one module per domain, each with its own `router`."""
