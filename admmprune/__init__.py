"""admmprune: structured pruning of JAX networks with ADMM."""
