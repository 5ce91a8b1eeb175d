"""Edge devices and (later) the wireless channel: what turns bytes and FLOPs into simulated seconds."""
