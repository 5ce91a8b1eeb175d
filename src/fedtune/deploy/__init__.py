"""Deployed federations on Flower: the ServerApp and ClientApp that run fedtune, ``fedtune deploy init`` and the
laboratory credentials. Modules here import Flower; nothing below this layer does at import time."""
