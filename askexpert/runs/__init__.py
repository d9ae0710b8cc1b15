"""Run folders: their fixed layout, their lock, the W&B id they keep, and reading a finished run back."""
