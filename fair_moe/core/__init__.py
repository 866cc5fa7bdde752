"""Core types every layer shares: errors, registries, budgets, plans, scores, signal statistics.

Nothing here touches a model; torch is imported lazily so that the command line's ``--help`` stays fast.
"""
