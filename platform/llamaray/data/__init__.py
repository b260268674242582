"""Training text: samples that need no download, and (later) the multi-source demo corpus."""
