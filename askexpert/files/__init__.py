"""Files as askexpert writes and reads them: atomically, checked, and never as code (checkpoints, hashes)."""
