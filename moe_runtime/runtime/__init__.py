"""moe_runtime.runtime"""
