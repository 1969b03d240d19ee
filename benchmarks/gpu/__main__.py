"""python -m benchmarks.gpu: see the package's docstring."""

from benchmarks.gpu.cli import main

main()
