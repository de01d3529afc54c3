"""The release of edgetune; manifests record it beside the files they describe."""
__version__ = "0.1.0"
