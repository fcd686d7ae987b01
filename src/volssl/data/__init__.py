"""Data layer: phantoms, readers, quality filter, preprocessing, chunked storage, patch stream."""
