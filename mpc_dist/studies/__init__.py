"""Studies that train many runs and write a document."""
