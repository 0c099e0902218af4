"""Every ``mechscope`` command, each defined once (its arguments, examples and handler), in one module per area.

Importing this package registers them all, in the order ``mechscope --help`` lists them.
"""

from . import model, techniques, circuits, sae, graphs, diffing, projects  # noqa: F401, I001  (registration order)
