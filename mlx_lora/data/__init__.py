"""Data: the KB, the question bank, split building, chat rendering and encoding, batching, text similarity."""
