"""Command-line tools: ``torusctl`` (admin), ``torusd`` (storage daemon), ``torusblk`` (NBD)."""
