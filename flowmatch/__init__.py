"""flowmatch: a Lightning platform for training and comparing flow-matching image generators.

Time convention everywhere (docs/spec.md §1): t = 0 is data, t = 1 is noise,
z_t = a_t * x0 + b_t * eps.
"""

__version__ = "0.1.0"
