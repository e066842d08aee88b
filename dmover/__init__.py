"""Datamover command line."""
