"""Threat-intelligence commands: intel import, export, search."""
