"""Split learning: cutting a model into client head, server body and (U-shape) client tail."""
