"""Benchmarks behind ``volssl bench NAME``: each module defines ``add_arguments(parser)`` and
``run(args) -> dict``; both sides of a comparison are measured in the same run and the dict carries
their ratio."""
