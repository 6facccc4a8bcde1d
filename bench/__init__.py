"""Speed and memory comparisons with peer systems, run on demand (`make bench`); not part of the test suite."""
