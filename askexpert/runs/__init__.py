"""Run folders: their layout, their lock, the W&B id they keep and the record of their stages."""
