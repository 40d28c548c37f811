import os as _os
import sys as _sys

# Hydra finds sweeper plugins only in the ``hydra_plugins`` namespace: the tuning sweeper's lives here
# (conf/hydra/sweeper/tune.yaml, trainer/sweep.py).
_PLUGINS = _os.path.join(_os.path.dirname(__file__), "plugins")
if _PLUGINS not in _sys.path:
    _sys.path.append(_PLUGINS)
