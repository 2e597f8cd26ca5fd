"""Evidence producers: each pillar turns a query and the knowledge base into ``Evidence``."""
