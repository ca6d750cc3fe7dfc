"""Version of the influenciae package."""
__version__ = "0.4.0"
