"""scan-direction NAS: search the token-scan orders of vision Mamba layers (LocalMamba, arXiv 2403.09338)."""
__version__ = "0.1.0"
