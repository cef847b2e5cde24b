"""Benchmarks and the GPU check: scripts over kd's public entry points, kept out of the library (kd/ never imports
them). Run from the repository root: python -m tools.bench, python -m tools.gpu_check."""
