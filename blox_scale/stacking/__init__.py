"""Scan over layers: `Stack` (stacked params, lax.scan, remat per layer), `Group`, remat policies, stacked <-> per-layer layouts."""
