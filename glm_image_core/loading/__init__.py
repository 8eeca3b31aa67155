"""Loading: the network registry, checkpoints (folders, single files), weight streaming and the memory plan."""
