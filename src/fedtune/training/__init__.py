"""Local training shared by every client and server role: optimizer steps with guards, evaluation, sample streams."""
