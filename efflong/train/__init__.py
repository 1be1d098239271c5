"""The trainer and what it needs: mesh and sharding, optimizer, checkpoints, metrics, sweeps."""
