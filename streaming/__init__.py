"""Conversion engine."""
