"""Isolation backends for analyst scripts behind one contract, and the broker protocol."""
