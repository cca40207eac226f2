"""Sentinel: pipeline-parallel training across untrusted volunteers, screened SENTINEL-style."""

__version__ = "0.1.0"
