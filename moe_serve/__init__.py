"""moe_serve: serve Mixture-of-Experts layers across machines.

A master holds each MoE layer's gate, expert workers hold the experts, and the
client SDK (`moe_serve.client`) sends hidden states to the master over gRPC.
"""

__version__ = "0.1.0"
