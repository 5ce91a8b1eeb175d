"""Typed messages, their wire encoding, and the byte ledger every message is recorded in."""
