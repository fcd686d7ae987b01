"""Small single-purpose helpers shared by every layer."""
