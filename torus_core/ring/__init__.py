"""ring package."""
