"""Stand-alone benchmarks, run by hand with `python -m benchmarks.<name>`; not part of the test suite."""
