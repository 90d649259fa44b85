"""moe_runtime.dispatch"""
