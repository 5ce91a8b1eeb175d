"""Edge devices, the wireless channel and the per-round planners: what turns bytes and FLOPs into simulated seconds."""
