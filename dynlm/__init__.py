"""dynlm: dynamical language models whose weights keep changing while they read."""
__version__ = "0.1.0"
