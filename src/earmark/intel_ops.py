"""Threat intelligence in the knowledge base: import, export, search, infrastructure evidence."""
