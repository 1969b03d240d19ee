"""Runs: the run store (one SQLite database per run directory), the sweep loop and where it
executes (this process or Ray), and writing tables and figures into a run directory."""
