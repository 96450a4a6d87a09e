"""Shipped example tasks: each module builds its data (and, for tests, a tiny model) locally."""
