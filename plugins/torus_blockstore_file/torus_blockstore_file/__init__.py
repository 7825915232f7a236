"""torus persistent block store: slab file plus index, crash-safe"""
