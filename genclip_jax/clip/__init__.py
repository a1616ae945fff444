"""clip package."""
