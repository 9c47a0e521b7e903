"""Tools: benchmarks and reports (run as `python -m infopt.tools.<name>`)."""
