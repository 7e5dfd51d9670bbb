"""libdrv package."""
