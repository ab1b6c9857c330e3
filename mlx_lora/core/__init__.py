"""The lowest layer: errors, configuration, files (atomic writes, locks), text normalisation, model preparation."""
