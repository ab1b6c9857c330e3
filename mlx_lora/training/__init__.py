"""Training: the one loop both backends share, its typed events, listeners, summary and the run folder."""
