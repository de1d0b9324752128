"""The train state, the one step builder, eval, populations, per-example grads, sharding."""
