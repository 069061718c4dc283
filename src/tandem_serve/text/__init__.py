"""Text-embedding stages: tokenize, token embedding, encoder."""
