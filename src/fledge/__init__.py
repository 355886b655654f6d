"""fledge: from your own data to a small language model you can ship.

Library first: every CLI verb is a function here (`fledge.prepare.prepare`,
`fledge.train.train`, `fledge.sample.generate_text`, ...), taking its part of one
validated `fledge.recipe.Recipe`.
"""

__version__ = "0.1.0"
