"""The fault-injection harness: runs the binary under faults and accounts for lost steps and records
(`harness`; `benchmarks/faults.py`, tests/faults/). The trainer's own test-only hooks are training/fault_hooks.py."""
