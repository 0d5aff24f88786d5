"""Performance tooling: parameter and FLOP summaries (and, as they land, the MFU benchmark harness)."""
