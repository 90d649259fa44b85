"""moe_runtime.sim"""
