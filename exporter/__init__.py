"""r1c.exporter"""
