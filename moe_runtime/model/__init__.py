"""moe_runtime.model"""
