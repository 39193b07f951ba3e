"""Block backends: the only code that opens or reads the image file (opened O_RDONLY, never written)."""
