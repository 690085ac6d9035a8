"""Ray Tune studies whose trials are full Ray Train runs."""
