"""Adapters that run third-party models' MoE layers on a moe_serve service."""
