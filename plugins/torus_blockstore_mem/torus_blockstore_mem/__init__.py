"""torus in-memory block store (tests, client write caches)"""
