"""Helpers shared by the tests (not fixtures: those are in conftest.py). This folder is also on the path of
the subprocesses tests start (`killer.py`)."""
