"""Scale-out: logical sharding rules and meshes, jax.distributed, process-local batches -> global arrays."""
