"""NVFlare integration: the client loop, recipe builders and result readers.

This is the only package in fedimg that imports ``nvflare``.
"""
