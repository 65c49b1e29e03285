"""Learned concepts as files other tools read, generation with them, their maps and metrics."""
