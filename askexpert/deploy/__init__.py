"""Deployment of an export: the expert server (`serve`: wire format, batching, both engines, metrics), the edge
side's client with its circuit breakers, an emulated link for measuring, and how latency is timed."""
