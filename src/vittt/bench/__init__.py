"""Efficiency measurement: MAC counting (and, later, latency / memory sweeps)."""
from .flops import count_macs, count_params
