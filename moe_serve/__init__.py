"""moe-serve: distributed serving of Mixture-of-Experts layers over gRPC."""

__version__ = "0.1.0"
