"""Data plumbing: offline assets, datasets, calibration windows and token caches, model loading."""
