"""Utilities every layer may use: atomic files and safe loads, devices and dtypes, progress, the training monitor."""
