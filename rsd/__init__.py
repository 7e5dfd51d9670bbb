"""rsd package."""
