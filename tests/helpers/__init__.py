"""Helpers shared by the tests (import them as `helpers.<module>`; fixtures live in conftest.py)."""
