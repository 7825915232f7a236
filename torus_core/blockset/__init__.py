"""blockset package."""
