"""Benchmarks behind ``sgdlab bench``. Results and commands are recorded in BENCHMARKS.md."""
