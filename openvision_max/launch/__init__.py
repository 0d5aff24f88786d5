"""Launchers: `python -m openvision_max.launch local` (N processes on this machine, `local_cluster.py`);
the GKE TPU node-pool launcher lands here too. Nothing here imports JAX: the launcher's process stays light."""
