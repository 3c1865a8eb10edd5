"""rayalign: Ray-native DPO and Constrained Preference Optimization."""

__version__ = "0.1.0"
