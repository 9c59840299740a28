"""Presentation only: figures and tables made from measured results."""
