"""earmark: evidence-based attribution of cyber attacks."""

__version__ = "0.1.0"
