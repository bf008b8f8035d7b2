"""Built-in passes, one per file. Importing this package registers every module in it.

To find the pass behind a pipeline step, open ``vitqc/passes/<step name>.py``.
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
