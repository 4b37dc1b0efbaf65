"""Plumbing that the rest of the project shares; none of it knows what a GPT is.

    safetensors.py        the safetensors file format, written and read here (never pickle)
    timing.py             medians of timed calls that take turns, for a noisy machine
    finite_differences.py central differences, to check hand-written gradients
    modules.py            picking modules by name and replacing them by path
    torch_compat.py       the calls whose names differ between torch 2.1 and today's torch
    checks.py             what a config field may hold (a number, a whole number; never a bool)
    progress.py           the one-line progress display of long loops
"""
