"""Benchmarks of qloc; run each from the repository root (see NOTES.md)."""
