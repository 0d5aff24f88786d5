"""Fault injection for the reliability suite: test-only hooks in the trainer (`hooks`) and a harness that runs
the binary under faults and accounts for lost steps and records (`harness`; `benchmarks/faults.py`)."""
