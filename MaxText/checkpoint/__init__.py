"""Checkpoints: Orbax save and restore with checksums, converted tensor files."""
