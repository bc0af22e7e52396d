"""Runtime (layer L4): datasets (tfds + grain), orbax checkpoints and saved
models, multi-device and multi-process execution, and export."""
