"""Research and demos: the miniature experiments, their analysis, and the quick-start demo.

Run as modules (``python -m custom_networks.research.experiments``, ``python -m custom_networks.research.demo``);
nothing below ``research`` imports from it.
"""
