"""Offline quality instruments: associative recall vs cache size, loss by position, passkey retrieval."""
