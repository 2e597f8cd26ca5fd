"""Renderers of the one result document: text, JSON, HTML, STIX 2.1, MISP, YARA."""
