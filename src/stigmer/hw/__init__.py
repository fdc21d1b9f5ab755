"""Knowing the machine: RAM, CPU, GPUs and disk (report.detect), and what a model needs of them (fit)."""
