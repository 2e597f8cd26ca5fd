"""Knowledge-base commands: ingest, attribute, compare, demo."""
