"""The Ray Serve application (see serve/app.py)."""
