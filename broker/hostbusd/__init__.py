"""hostbusd: the hostbus message broker daemon."""

__version__ = "0.1.0"
