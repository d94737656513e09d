"""tilefx's fx passes: the receptive-field analysis, the tile rewrite and the memory model."""
