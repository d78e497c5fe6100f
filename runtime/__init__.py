"""r1c.runtime"""
