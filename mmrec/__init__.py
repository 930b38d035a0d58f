"""MM-Rec runtime."""
