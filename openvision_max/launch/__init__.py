"""Launchers: the local multi-process cluster and the GKE TPU node-pool launcher land here (none yet)."""
