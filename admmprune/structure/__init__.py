"""Structure of a network (layer L3): channel dependency groups discovered from
the traced program, importance criteria, gates, costs (MACs), measurements,
and the collapse into a physically smaller model."""
