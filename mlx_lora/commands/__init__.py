"""CLI commands, one module per command (group); each stays light to import: heavy work is imported on call."""
