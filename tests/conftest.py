import jax

# Every test runs with strict dtype promotion: silent upcasts are bugs here.
jax.config.update("jax_numpy_dtype_promotion", "strict")
