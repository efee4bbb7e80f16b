"""Placeholder until implemented in this session."""
